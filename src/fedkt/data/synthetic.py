"""Synthetic multiple-choice examples as text: one template to render them for generation, and strict
parsers for what a language model writes back.

The template (``render_mc``), the one used in generation prompts and few-shot demonstrations::

    Question: Which gas do plants take in for photosynthesis?
    A. oxygen
    B. carbon dioxide
    C. helium
    D. water
    Answer: B

``parse_mc`` reads one such block, ``parse_many`` every block in a generation (a block starts at a line
``Question:``; text before the first block and after a block's answer line is ignored). Model output
varies, so the parser accepts a few harmless variants: ``**Question:**`` / ``Question 3:`` headers,
choice labels ``A.`` ``A)`` ``A:`` ``(A)``, blank lines, a question spread over several lines,
``Answer: (b)`` / ``Answer: B. carbon dioxide`` / ``Correct answer: B`` / the choice text itself.
Everything is whitespace-normalised (runs of whitespace, line breaks included, become one space).

It is strict about content, because a malformed synthetic example is worse than none. A block is
rejected, with the reason counted in :class:`ParseStats`, when:

* there is no choice list or no answer line, or the labels do not run A, B, C, ... in order;
* it has fewer than 3 or more than 5 choices, an empty choice, or two choices equal up to case and
  whitespace;
* the answer is not one of the labels, or names a label and a text that disagree;
* the question is empty or longer than ``MAX_QUESTION_CHARS`` (a choice: ``MAX_CHOICE_CHARS``);
* the question or a choice carries a template marker (``Answer:`` / ``Question:``, e.g. a leaked answer
  inside the question) or a control character.

Round trip: for an example whose fields are whitespace-normalised and valid (``mc_problem(ex)`` is
None), ``parse_mc(render_mc(ex), task=ex.task, id=ex.id) == ex``; parsed examples are built like the
task loaders build them (``target`` = the gold choice text, ``label`` = its index as a string).

``parse_indices`` reads an LLM's answer to "which of these samples are eligible?" ("1, 3, 4",
"[1,3]", "Samples 2 and 5", "2-4", "None", "All") into 0-based positions; anything it cannot read
with certainty (stray words, numbers out of range, decimals) gives the empty set, the safe default.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from fedkt.data.tasks import Example

MIN_CHOICES = 3
MAX_CHOICES = 5
MAX_QUESTION_CHARS = 1000
MAX_CHOICE_CHARS = 300
MAX_TEXT_CHARS = 200_000
"""Longer generations are cut to this many characters before parsing (bounded work per call)."""
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Each pattern is anchored and built so that no two adjacent parts can match the same character
# (one class for leading spaces and markdown, then a literal): matching is linear in the line length.
_HEADER = re.compile(r"^[ \t#>*-]*question[ \t*]*(?:\d+[ \t*]*)?:[ \t*]*", re.I)
_CHOICE = re.compile(r"^[ \t*]*(?:\(([A-Z])\)|([A-Z])[.):])\**(?:[ \t]+(.*))?$")
_ANSWER = re.compile(r"^[ \t*]*(?:(?:correct|final)[ \t]+)?answer[ \t*]*:(.*)$", re.I)
_PURE_LETTER = re.compile(r"^\(?([A-Za-z])\)?[.):]?$")
_LETTER_TEXT = re.compile(r"^\(?([A-Z])\)?[.):][ \t]*(.+)$")
_MARKER = re.compile(r"\b(?:answer|question)[ \t]*:", re.I)


def normalize(text: str) -> str:
    """Collapse every run of whitespace (line breaks included) to one space; strip the ends."""
    return " ".join(text.split())


def _key(text: str) -> str:
    return normalize(text).casefold()


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


@dataclass
class ParseStats:
    """How many blocks were accepted, and how many were rejected for each reason."""

    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)

    def add(self, reason: str | None) -> None:
        if reason is None:
            self.accepted += 1
        else:
            self.rejected[reason] += 1

    def merge(self, other: "ParseStats") -> None:
        self.accepted += other.accepted
        self.rejected.update(other.rejected)

    @property
    def total(self) -> int:
        return self.accepted + sum(self.rejected.values())

    def to_dict(self) -> dict:
        return {"accepted": self.accepted, "rejected": dict(sorted(self.rejected.items()))}


# --------------------------------------------------------------------------------------------------
# Multiple choice


def make_mc(question: str, choices, answer: int, task: str = "synthetic", id: str = "") -> Example:
    """An MC example built the way the task loaders build them (fields whitespace-normalised)."""
    texts = tuple(normalize(c) for c in choices)
    return Example(task=task, id=id, question=normalize(question), choices=texts, answer=answer,
                   target=texts[answer], label=str(answer))


def mc_problem(ex: Example) -> str | None:
    """Why ``ex`` is not a valid synthetic MC example (a reason code), or None if it is."""
    if not ex.question.strip():
        return "empty_question"
    if len(ex.question) > MAX_QUESTION_CHARS:
        return "question_too_long"
    if len(ex.choices) < MIN_CHOICES:
        return "too_few_choices"
    if len(ex.choices) > MAX_CHOICES:
        return "too_many_choices"
    if any(not c.strip() for c in ex.choices):
        return "empty_choice"
    if any(len(c) > MAX_CHOICE_CHARS for c in ex.choices):
        return "choice_too_long"
    if len({_key(c) for c in ex.choices}) < len(ex.choices):
        return "duplicate_choices"
    if not 0 <= ex.answer < len(ex.choices):
        return "answer_not_a_choice"
    if _MARKER.search(ex.question):
        return "marker_in_question"
    if any(_MARKER.search(c) for c in ex.choices):
        return "marker_in_choice"
    if _has_control(ex.question) or any(_has_control(c) for c in ex.choices):
        return "control_character"
    return None


def render_mc(ex: Example) -> str:
    """The generation template for one example (no trailing newline)."""
    if not ex.is_mc:
        raise ValueError(f"example {ex.id!r} has no choices; render_mc renders multiple-choice examples")
    if len(ex.choices) > len(LETTERS) or not 0 <= ex.answer < len(ex.choices):
        raise ValueError(f"example {ex.id!r}: answer {ex.answer} / {len(ex.choices)} choices cannot be rendered")
    lines = [f"Question: {ex.question}"]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices)]
    lines.append(f"Answer: {LETTERS[ex.answer]}")
    return "\n".join(lines)


Complete = Callable[[list[str], int, list[str], str], list[str]]
"""``complete(prompts, max_new_tokens, stop, tag)``: one continuation per prompt, cut at the first stop
string; ``tag`` names the step (``"question"``, ``"choice-A"``, ..., ``"answer"``) for seeding."""


def fill_mc_template(complete: Complete, prompts: Sequence[str], answers: Sequence[str | None] | None = None,
                     n_choices: int = 4, question_tokens: int = 64, choice_tokens: int = 24) -> list[str]:
    """Template-guided generation: a model writes each field of ``render_mc``'s template in turn.

    Each prompt ends with ``Question:``. The model continues it up to the end of the line (the
    question), then each choice after the template's own label (``A.``, ``B.``, ...; one line each), then
    the answer after ``Answer:`` unless ``answers[i]`` gives the letter (FDKT's clients condition each
    sample on its answer letter, so the template writes it). The template, the line structure and the
    labels are fixed; only field contents come from the model, so a small model's samples fail only on
    content (an empty or repeated field, a template marker inside a field), which ``parse_mc`` still
    checks. Returns each filled template without its leading ``Question:`` (what a free-running model
    would have written after the prompt), one generation call per field for all prompts together.
    """
    if not 1 <= n_choices <= len(LETTERS):
        raise ValueError(f"n_choices must be in 1..{len(LETTERS)}, got {n_choices}")
    prompts = list(prompts)
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
    if not prompts:
        return []
    bodies = [" " + normalize(q) for q in complete(prompts, question_tokens, ["\n"], "question")]
    for i in range(n_choices):
        label = LETTERS[i]
        outs = complete([p + b + f"\n{label}." for p, b in zip(prompts, bodies)], choice_tokens, ["\n"],
                        f"choice-{label}")
        bodies = [b + f"\n{label}. " + normalize(o) for b, o in zip(bodies, outs)]
    todo = [j for j in range(len(prompts)) if answers is None or answers[j] is None]
    written = dict(zip(todo, complete([prompts[j] + bodies[j] + "\nAnswer:" for j in todo], 3, ["\n"], "answer")
                           if todo else []))
    return [b + "\nAnswer: " + (normalize(written[j]) if j in written else str(answers[j]))  # type: ignore[index]
            for j, b in enumerate(bodies)]


def _answer_index(value: str, choices: list[str]) -> tuple[int | None, str | None]:
    value = normalize(value).strip("* ")  # markdown bold around the answer
    if not value:
        return None, "empty_answer"
    m = _PURE_LETTER.match(value)
    if m:
        i = LETTERS.find(m.group(1).upper())
        return (i, None) if i < len(choices) else (None, "answer_not_a_choice")
    m = _LETTER_TEXT.match(value)
    if m:
        i = LETTERS.find(m.group(1))
        if i >= len(choices):
            return None, "answer_not_a_choice"
        text = m.group(2).lstrip("* ").rstrip("* .")
        return (i, None) if _key(text) in (_key(choices[i]), _key(choices[i].rstrip("."))) else (
            None, "answer_text_mismatch")
    hits = [i for i, c in enumerate(choices) if _key(c) == _key(value.rstrip("."))]
    if len(hits) == 1:
        return hits[0], None
    return None, "bad_answer"


def _parse_block(lines: list[str], task: str, id: str) -> tuple[Example | None, str | None]:
    """One block: ``lines[0]`` is the header line with its ``Question:`` prefix already removed."""
    i = 1
    while i < len(lines) and not _CHOICE.match(lines[i]):  # the question runs until the first choice
        i += 1
    if i == len(lines):
        return None, "no_choices"
    question = normalize(" ".join(lines[:i]))
    choices: list[str] = []
    answer_value: str | None = None
    for line in lines[i:]:
        if not line.strip():
            continue
        m = _CHOICE.match(line)
        if m:
            label = m.group(1) or m.group(2)
            if len(choices) >= len(LETTERS) or label != LETTERS[len(choices)]:
                return None, "choice_labels_out_of_order"
            choices.append(normalize(m.group(3) or ""))
            continue
        a = _ANSWER.match(line)
        if a:
            answer_value = a.group(1)
            break
        return None, "unexpected_line"
    if answer_value is None:
        return None, "no_answer"
    if len(choices) < MIN_CHOICES:
        return None, "too_few_choices"
    if len(choices) > MAX_CHOICES:
        return None, "too_many_choices"
    gold, why = _answer_index(answer_value, choices)
    if gold is None:
        return None, why
    ex = Example(task=task, id=id, question=question, choices=tuple(choices), answer=gold,
                 target=choices[gold], label=str(gold))
    why = mc_problem(ex)
    return (None, why) if why else (ex, None)


def _blocks(text: str) -> list[list[str]]:
    """Split a generation into blocks, each starting at a ``Question:`` header line."""
    blocks: list[list[str]] = []
    for line in text[:MAX_TEXT_CHARS].splitlines():
        m = _HEADER.match(line)
        if m:
            blocks.append([line[m.end():]])
        elif blocks:
            blocks[-1].append(line)
    return blocks


def parse_mc(text: str, task: str = "synthetic", id: str = "", stats: ParseStats | None = None) -> Example | None:
    """Exactly one example from ``text``, or None (the reason is counted in ``stats``)."""
    ex, why = _parse_one(text, task, id)
    if stats is not None:
        stats.add(why)
    return ex


def _parse_one(text: str, task: str, id: str) -> tuple[Example | None, str | None]:
    if not isinstance(text, str):
        return None, "not_text"
    blocks = _blocks(text)
    if not blocks:
        return None, "no_question"
    if len(blocks) > 1:
        return None, "multiple_questions"
    return _parse_block(blocks[0], task, id)


def parse_many(text: str, task: str = "synthetic", id_prefix: str = "syn-",
               stats: ParseStats | None = None) -> list[Example]:
    """Every valid example in ``text``, in order; ids are ``id_prefix`` + the 0-based count of accepted
    examples. Each rejected block's reason is counted in ``stats`` (a text with no block counts as
    ``no_question``)."""
    stats = stats if stats is not None else ParseStats()
    if not isinstance(text, str):
        stats.add("not_text")
        return []
    blocks = _blocks(text)
    if not blocks:
        stats.add("no_question")
        return []
    out: list[Example] = []
    for block in blocks:
        ex, why = _parse_block(block, task, f"{id_prefix}{len(out)}")
        stats.add(why)
        if ex is not None:
            out.append(ex)
    return out


# --------------------------------------------------------------------------------------------------
# "Which samples are eligible?" answers

_TOKEN = re.compile(r"\d+[ \t]*[-–][ \t]*\d+|\d+(?:[.,]\d+)+(?![\d])|\d+|[^\W\d_]+|\S", re.UNICODE)
_FILLER = frozenset(
    "sample samples example examples item items question questions index indices id ids number numbers "
    "nos and or the are is eligible selected valid answer final following these those of them only s "
    "include includes including".split())
_IGNORED_PUNCT = frozenset(",;:[](){}&#.*\"'`-–")


def parse_indices(text: str, n: int, base: int = 1) -> set[int]:
    """0-based positions named by an LLM's "which samples are eligible" answer, for ``n`` candidates
    numbered from ``base`` in the prompt. Malformed answers give the empty set.

    Read as a whole first, then line by line (the first line that reads cleanly wins), so an answer
    followed by an explanation still counts. Accepted words are fillers ("samples", "and", "are",
    "eligible", ...), "none"/"no" (the empty set) and "all" (every candidate); any other word, a
    decimal, or a number outside ``[base, base + n)`` makes the reading malformed.
    """
    got = read_indices(text, n, base)
    return set() if got is None else got


def read_indices(text: str, n: int, base: int = 1) -> set[int] | None:
    """Like :func:`parse_indices`, but tells a malformed answer (None) from an explicit "None" (the empty
    set), so a caller can count the malformed ones."""
    if not isinstance(text, str) or n <= 0 or len(text) > MAX_TEXT_CHARS:
        return None
    got = _read_indices(text, n, base)
    if got is not None:
        return got
    for line in text.splitlines():
        got = _read_indices(line, n, base)
        if got is not None:
            return got
    return None


def _read_indices(text: str, n: int, base: int) -> set[int] | None:
    """None when ``text`` is not a clean answer."""
    nums: set[int] = set()
    none = every = False
    for tok in _TOKEN.findall(text.casefold()):
        if tok[0].isdigit():
            if any(len(d) > 9 for d in re.findall(r"\d+", tok)):  # far out of range (and int() limits)
                return None
            if "." in tok or "," in tok:  # 1.5 or 1,000: not an index list we can trust
                if re.fullmatch(r"\d+(?:,\d+)+", tok):  # "1,3,4" without spaces is a list
                    nums.update(int(x) for x in tok.split(","))
                    continue
                return None
            parts = re.split(r"[ \t]*[-–][ \t]*", tok)
            lo, hi = int(parts[0]), int(parts[-1])
            if hi < lo or hi - lo > n:
                return None
            nums.update(range(lo, hi + 1))
        elif tok in _FILLER or tok in _IGNORED_PUNCT:
            continue
        elif tok in ("none", "no"):
            none = True
        elif tok == "all":
            every = True
        else:
            return None
    if none + every + bool(nums) != 1:  # nothing, or contradictions like "none ... 3"
        return None
    if none:
        return set()
    if every:
        return set(range(n))
    if any(not base <= k < base + n for k in nums):
        return None
    return {k - base for k in nums}
