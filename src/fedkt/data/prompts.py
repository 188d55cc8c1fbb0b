"""Prompt templates: how an :class:`Example` becomes a context and a continuation.

The multiple-choice template is lm-evaluation-harness's for ARC ("Question: ...\\nAnswer:" followed by
" choice"), used for every MC task so scores compare with published zero-shot numbers. GSM8K uses the
same frame with the worked answer as continuation.
"""

from __future__ import annotations

from fedkt.data.tasks import Example


def context(ex: Example) -> str:
    return f"Question: {ex.question}\nAnswer:"


def continuation(text: str) -> str:
    return " " + text


def training_text(ex: Example) -> tuple[str, str]:
    """(prompt, answer) pair for answer-only supervised fine-tuning."""
    return context(ex), continuation(ex.target)
