"""Config problems raised together: a config with several mistakes names all of them in one error.

Why: a user fixing a config one error per run pays a run (on a cluster: an allocation) per mistake. Each config's
``__post_init__`` collects its value problems and raises them at once; ``parse_config`` (config/trainer.py) renames
each to the key the user typed and joins the sub-configs' problems into one block.
"""

from __future__ import annotations


class ConfigProblems(ValueError):
    """Every problem found; a single one reads as itself, several as one block, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(self.problems[0] if len(self.problems) == 1 else
                         f"{len(self.problems)} config problems:\n  " + "\n  ".join(self.problems))


def raise_problems(problems: list[str]) -> None:
    """Raise ``problems`` together (nothing when there are none)."""
    if problems:
        raise ConfigProblems(problems)
