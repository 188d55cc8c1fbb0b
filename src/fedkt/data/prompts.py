"""Prompt templates: how an :class:`Example` becomes a context, its choices and a continuation.

Multiple-choice prompts are lm-evaluation-harness 0.4.13's task definitions, chosen per example by
``Example.task`` (the harness's ``doc_to_text``, ``doc_to_choice`` and ``target_delimiter``):

============== ============================================================ ==================
task           context (``doc_to_text``)                                    choices
============== ============================================================ ==================
arc_easy,      ``"Question: {question}\\nAnswer:"``                          the choice texts
arc_challenge  (``arc_challenge.yaml`` includes ``arc_easy.yaml``)
openbookqa     ``"{question_stem}"`` -- the bare question, no frame          the choice texts
commonsense_qa ``"Question: {question.strip()}\\nA. {c0}\\nB. {c1}...\\nAnswer:"`` the letters A, B, ..
(any other)    ARC's ``"Question: {question}\\nAnswer:"``                    the choice texts
============== ============================================================ ==================

The continuation scored for a choice is ``target_delimiter + choice`` with the harness's default
delimiter ``" "``; ``acc_norm`` divides by the character length of the *choice* (without the delimiter),
see :mod:`fedkt.evaluate`. GSM8K (generation) uses ARC's frame with the worked answer as continuation.

That table is the "harness" format, the default. ``Example.format = "cloze"`` (``eval.format``, applied to
loaded data by :func:`with_format`) scores each choice's *text* as the continuation wherever the harness
scores something else: CommonsenseQA becomes ARC's ``"Question: {question}\nAnswer:"`` + ``" {choice}"``
(no lettered list); ARC and OpenBookQA, whose harness prompts already score the choice texts, read the
same in both formats. Generation examples have one format.

Training uses the same strings: :func:`training_text` is (context, delimiter + gold choice), so a model
fine-tuned on a task is trained on exactly the prompt it is evaluated with (for CommonsenseQA in the
harness format that means learning to answer with the letter, as the harness scores it; in the cloze
format, with the answer's text).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from fedkt.config import PROMPT_FORMATS, EvalConfig
from fedkt.data.tasks import Example

TARGET_DELIMITER = " "
"""lm-evaluation-harness's default ``target_delimiter``, used by all four MC tasks."""


def _question_answer(ex: Example) -> str:
    return f"Question: {ex.question}\nAnswer:"


def _bare_question(ex: Example) -> str:
    return ex.question


def _lettered(ex: Example) -> str:
    lines = "".join(f"\n{chr(ord('A') + i)}. {c}" for i, c in enumerate(ex.choices))
    return f"Question: {ex.question.strip()}{lines}\nAnswer:"


def _texts(ex: Example) -> tuple[str, ...]:
    return ex.choices


def _letters(ex: Example) -> tuple[str, ...]:
    return tuple(chr(ord("A") + i) for i in range(len(ex.choices)))


@dataclass(frozen=True)
class Template:
    """One task's prompt: ``doc_to_text`` (context), ``doc_to_choice`` (choices) and the delimiter."""

    text: Callable[[Example], str]
    choices: Callable[[Example], tuple[str, ...]] = _texts
    target_delimiter: str = TARGET_DELIMITER


DEFAULT = Template(_question_answer)
TEMPLATES: dict[str, Template] = {
    "arc_easy": DEFAULT,
    "arc_challenge": DEFAULT,
    "openbookqa": Template(_bare_question),
    "commonsense_qa": Template(_lettered, _letters),
}
"""The "harness" format: lm-evaluation-harness 0.4.13's template of each task."""
CLOZE_TEMPLATES: dict[str, Template] = {**TEMPLATES, "commonsense_qa": DEFAULT}
"""The "cloze" format: every task scores its choice texts; CommonsenseQA takes ARC's frame."""
FORMAT_TEMPLATES: dict[str, dict[str, Template]] = {"harness": TEMPLATES, "cloze": CLOZE_TEMPLATES}
assert tuple(FORMAT_TEMPLATES) == PROMPT_FORMATS, "a prompt format of fedkt.config without templates"


def template(ex: Example) -> Template:
    """The template of ``ex.task`` in ``ex.format``; tasks without one of their own use ARC's."""
    table = FORMAT_TEMPLATES.get(ex.format)
    if table is None:
        raise ValueError(f"example {ex.id} of task {ex.task}: prompt format {ex.format!r} is not one of "
                         f"{', '.join(map(repr, PROMPT_FORMATS))} (set it with eval.format)")
    return table.get(ex.task, DEFAULT)


def with_format(examples: Sequence[Example], formats: EvalConfig) -> list[Example]:
    """``examples`` in the prompt format ``formats`` (the experiment's ``[eval]``) gives their task:
    ``formats.format_of(ex.task)``; generation examples stay as they are. Apply it wherever examples
    are loaded or made, so that training and scoring read the same prompts."""
    out = []
    for ex in examples:
        f = formats.format_of(ex.task) if ex.is_mc else ex.format
        out.append(ex if f == ex.format else replace(ex, format=f))
    return out


def context(ex: Example) -> str:
    """The prompt the continuation follows (the harness's ``doc_to_text``)."""
    return template(ex).text(ex)


def choices(ex: Example) -> tuple[str, ...]:
    """What each choice's continuation says after the delimiter (the harness's ``doc_to_choice``)."""
    return template(ex).choices(ex)


def per_char(ex: Example, lls) -> list[float]:
    """Each choice's score per character of the choice string (delimiter excluded): what the harness's
    ``acc_norm`` takes the argmax of (``completion_len`` in its ``process_results``); an empty choice gives
    an infinity of its score's sign (NaN for a zero score)."""
    return [ll / n if n else math.copysign(math.inf, ll) if ll else math.nan
            for ll, n in zip(lls, (len(c) for c in choices(ex)))]


def continuation(text: str, ex: Example | None = None) -> str:
    """``text`` as a continuation: prefixed by the target delimiter of ``ex``'s task (``" "``)."""
    delim = template(ex).target_delimiter if ex is not None else TARGET_DELIMITER
    return delim + text


def continuations(ex: Example) -> list[str]:
    """The scored continuation of every choice of ``ex``, in order."""
    t = template(ex)
    return [t.target_delimiter + c for c in t.choices(ex)]


def training_text(ex: Example) -> tuple[str, str]:
    """(prompt, answer) pair for answer-only supervised fine-tuning: the evaluation prompt and the gold
    choice's continuation (MC), or the worked answer (generation)."""
    if ex.is_mc:
        return context(ex), continuations(ex)[ex.answer]
    return context(ex), continuation(ex.target, ex)
