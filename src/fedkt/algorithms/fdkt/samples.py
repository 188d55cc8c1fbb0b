"""What an FDKT synthetic sample is, for both sides: the public prefix a sample is conditioned on, the
public sampling plan, the key that makes two samples the same, and reading samples back from text."""

from __future__ import annotations

from fedkt.data.synthetic import LETTERS, MAX_CHOICES, MIN_CHOICES, ParseStats, normalize, parse_mc, render_mc
from fedkt.data.tasks import Example

TOPICS = {"arc_easy": "grade-school science", "arc_challenge": "grade-school science (hard)",
          "openbookqa": "elementary science", "commonsense_qa": "commonsense reasoning"}


def topic(task: str) -> str:
    """The readable topic a task's questions are about (the task name for tasks without one)."""
    return TOPICS.get(task, task.replace("_", " "))


def question_key(ex: Example) -> str:
    """What makes two synthetic questions the same: the question text up to case and whitespace."""
    return normalize(ex.question).casefold()


def synth_prefix(task: str, letter: str) -> str:
    """What a synthetic example is conditioned on: its topic and its answer letter (public, not data)."""
    return f"Write a multiple-choice question for a {topic(task)} test. The correct answer is {letter}.\nQuestion:"


def generation_text(ex: Example) -> tuple[str, str]:
    """(prompt, target) of the DP training example: the prefix, then ``ex`` in the template."""
    return synth_prefix(ex.task, LETTERS[ex.answer]), render_mc(ex)[len("Question:"):]


DEFAULT_CHOICES = 4


def task_choices(tasks: list[str], eval_sets: dict[str, list[Example]] | None = None) -> dict[str, int]:
    """Each task's number of choices: the most common among its (public) evaluation questions, ties to the
    smaller, within the 3..5 a synthetic example may have; 4 for a task without evaluation questions. CommonsenseQA stays 5-choice, ARC and OBQA 4."""
    out = {}
    for t in tasks:
        counts: dict[int, int] = {}
        for e in (eval_sets or {}).get(t, ()):
            if e.is_mc:
                counts[len(e.choices)] = counts.get(len(e.choices), 0) + 1
        n = min(counts, key=lambda k: (-counts[k], k)) if counts else DEFAULT_CHOICES
        out[t] = max(MIN_CHOICES, min(MAX_CHOICES, n))  # what a valid synthetic example may have
    return out


def sampling_plan(tasks: list[str], n: int, choices: dict[str, int] | None = None) -> list[tuple[str, str]]:
    """(task, letter) of each of ``n`` samples: tasks in turn, each task's letters in turn (balanced
    answers; A-D for a 4-choice task, A-E for a 5-choice one: ``choices``, default 4 each)."""
    def letter(task: str, j: int) -> str:
        return LETTERS[j % (choices or {}).get(task, DEFAULT_CHOICES)]

    return [(tasks[i % len(tasks)], letter(tasks[i % len(tasks)], i // len(tasks))) for i in range(n)]


def read_synthetic(texts: list[str], tasks: list[str], stats: ParseStats | None = None, prefix: str = "syn-"
                   ) -> list[Example]:
    """Synthetic examples back from their rendered texts (invalid ones dropped, counted in ``stats``)."""
    if len(texts) != len(tasks):
        raise ValueError(f"{len(texts)} synthetic texts but {len(tasks)} task tags")
    out = []
    for i, (t, task) in enumerate(zip(texts, tasks)):
        ex = parse_mc(t, task=str(task), id=f"{prefix}{i}", stats=stats)
        if ex is not None:
            out.append(ex)
    return out
