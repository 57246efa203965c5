"""The megatron-core bugs the actor works around, one named switch each, set from the installed version.

Why: a workaround kept for a release that fixed its bug is code nobody can reason about, and one dropped while a
release still needs it corrupts checkpoints quietly. So each bug has one switch here, ``True`` where the installed
megatron-core has it; the workaround runs only under its switch (megatron-core's own code runs otherwise), and
``tests/test_actor_checkpoint.py::test_megatron_core_bugs_match_their_switches`` shows on each CI stack that
every bug is present exactly where its switch is on. A release that fixes one turns that test red: then set the
bug's ``fixed_in`` to that release.

Checked by reading the source and running it: megatron-core 0.16.1 and 0.19.2 (CI's two stacks; 0.19.2 is the
newest release on PyPI) have all four. A bug with no fixing release yet is assumed present in later releases
too: dropping a workaround early would corrupt a resume, keeping one too long does not (the step and scheduler
workarounds are right either way, and the same test checks ``_param_state`` against the live weights anywhere).

The version is read from the package metadata, not ``megatron.core.__version__``: importing megatron-core takes
seconds, and this module is imported wherever the actor is (the test checks that the two agree).
"""

from __future__ import annotations

import importlib.metadata
from typing import Optional

from packaging.version import Version

MCORE_VERSION = Version(importlib.metadata.version("megatron-core"))


def _unfixed(fixed_in: Optional[str]) -> bool:
    """Whether the installed megatron-core predates ``fixed_in``, the first release without the bug (None: none)."""
    return fixed_in is None or MCORE_VERSION < Version(fixed_in)


# DistributedOptimizer.sharded_param_state_fully_reshardable cuts each parameter out of the DP-gathered buffers at
# its offset in the padded DDP buffer, but the gathered buffers leave out each bucket's end padding: every parameter
# after a padded bucket end is saved shifted (it warns "param range exceeds unpadded buffer"). Still in 0.19.2.
FULLY_RESHARDABLE_SAVE_SHIFTS_PARAMS = _unfixed(fixed_in=None)
# With torch's Adam (no Apex / Transformer Engine, e.g. on CPU) DistributedOptimizer's
# _set_main_param_and_optimizer_states copies every tensor of the live per-parameter state, ``step`` included,
# from the loaded state, which has no ``step``: KeyError: 'step'. Still in 0.19.2.
PARAM_STATE_LOAD_COPIES_ADAM_STEP = _unfixed(fixed_in=None)
# With torch's Adam, DistributedOptimizer.load_state_dict puts one step tensor into every parameter's state, and
# torch's Adam increments each parameter's step in place: the shared one advances once per parameter. Still in 0.19.2.
OPTIMIZER_LOAD_SHARES_ADAM_STEP = _unfixed(fixed_in=None)
# OptimizerParamScheduler.load_state_dict steps by the saved step count from wherever the scheduler is, right only
# for one that never stepped. Still in 0.19.2.
SCHEDULER_LOAD_ADDS_STEPS = _unfixed(fixed_in=None)
