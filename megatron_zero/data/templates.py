"""Prompt templates by name: the recipe's two (used verbatim), the tokenizer's own chat template, or a user string.

Why: SimpleRL-Zoo applies one of two fixed templates to each question without any chat template
(shared/reference/RECIPE.md): "simple" (alias "abel") for models that follow instructions poorly and "qwen-boxed"
for the rest. "chat" renders the tokenizer's chat template instead; any string containing ``{input}`` is a user
template. The question is substituted with ``str.replace``, never ``str.format``: questions and templates are full
of LaTeX braces (``\\boxed{}``).

How: ``format_prompt = make_prompt_formatter("qwen-boxed"); format_prompt("What is 1+1?")``.
"""

from collections.abc import Callable
from typing import Any, Optional

INPUT_PLACEHOLDER = "{input}"

_SIMPLE = "Question:\n{input}\nAnswer:\nLet's think step by step.\n"
PROMPT_TEMPLATES: dict[str, str] = {
    "simple": _SIMPLE,
    "abel": _SIMPLE,
    "qwen-boxed": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n{input}\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}
CHAT_TEMPLATE = "chat"


def check_template(template: str) -> None:
    """Raise unless `template` is a registered name, "chat", or a string containing {input}."""
    if template in PROMPT_TEMPLATES or template == CHAT_TEMPLATE or INPUT_PLACEHOLDER in template:
        return
    raise ValueError(
        f"prompt template {template!r} is unknown; use one of {sorted([*PROMPT_TEMPLATES, CHAT_TEMPLATE])} or a "
        f"format string containing {INPUT_PLACEHOLDER}, e.g. 'Problem: {INPUT_PLACEHOLDER}\\nSolution:'"
    )


def make_prompt_formatter(template: str, tokenizer: Optional[Any] = None) -> Callable[[str], str]:
    """question -> prompt text for `template`; "chat" needs a Hugging Face `tokenizer` with a chat template."""
    check_template(template)
    if template == CHAT_TEMPLATE:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "prompt template 'chat' renders the tokenizer's chat template, but "
                f"{'no tokenizer was given' if tokenizer is None else 'the tokenizer has no chat_template'}; "
                "pass a tokenizer with a chat template or use 'qwen-boxed' / 'simple'"
            )

        def render_chat(question: str) -> str:
            messages = [{"role": "user", "content": question}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        return render_chat
    text = PROMPT_TEMPLATES.get(template, template)
    return lambda question: text.replace(INPUT_PLACEHOLDER, question)
