"""N-gram overlap between texts: contamination of generated training data with evaluation questions, and
near-duplicates among generated examples.

**Contamination** (:class:`NgramIndex`, :func:`decontaminate`) follows the decontamination of GPT-3 (Brown
et al. 2020, appendix C) and lm-evaluation-harness: texts are lower-cased and reduced to their word tokens
(punctuation and whitespace dropped, :func:`words`); a generated text is *contaminated* if it shares at
least one word n-gram (n = 13 by default) with any evaluation text. A generated text shorter than n words
is contaminated if its whole word sequence occurs inside an evaluation text. An example's text is its
question followed by its choices (:func:`example_text`), so a copied question or a copied run of choices
is caught.

**Near-duplicates** (:func:`drop_near_duplicates`): two examples whose sets of word k-shingles (k = 3)
have Jaccard similarity ≥ a threshold are the same question in different words; the later one is
dropped. Found through an inverted index of shingles, so the cost grows with the shared shingles, not
with all pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from fedkt.data.tasks import Example

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The lower-cased word tokens of ``text`` (letters, digits, underscore; punctuation dropped)."""
    return _WORD.findall(text.casefold())


def ngrams(ws: Sequence[str], n: int) -> set[tuple[str, ...]]:
    """The set of word n-grams of ``ws`` (empty if it has fewer than n words)."""
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def example_text(ex: Example) -> str:
    """What is compared of a multiple-choice example: its question, then its choices."""
    return " ".join([ex.question, *ex.choices])


@dataclass
class NgramIndex:
    """The word n-grams of a set of evaluation texts, each remembered with the (task, id) it came from."""

    n: int
    grams: dict[tuple[str, ...], tuple[str, str]] = field(default_factory=dict)
    texts: list[tuple[str, str, str]] = field(default_factory=list)
    """(task, id, " w1 w2 … ") of every indexed text, for generated texts shorter than n words."""

    @classmethod
    def build(cls, eval_sets: Mapping[str, Sequence[Example]], n: int = 13) -> "NgramIndex":
        if n < 1:
            raise ValueError(f"the contamination n-gram size must be >= 1, got {n}")
        idx = cls(n)
        for task, exs in eval_sets.items():
            for ex in exs:
                ws = words(example_text(ex))
                idx.texts.append((task, ex.id, " " + " ".join(ws) + " "))
                for g in ngrams(ws, n):
                    idx.grams.setdefault(g, (task, ex.id))
        return idx

    def match(self, text: str) -> tuple[str, str] | None:
        """(task, id) of an evaluation text that ``text`` overlaps, or None if it is clean."""
        ws = words(text)
        if not ws:
            return None
        if len(ws) < self.n:
            needle = " " + " ".join(ws) + " "
            return next(((t, i) for t, i, hay in self.texts if needle in hay), None)
        for g in ngrams(ws, self.n):
            hit = self.grams.get(g)
            if hit is not None:
                return hit
        return None


def decontaminate(examples: Iterable[Example], index: NgramIndex, n_samples: int = 3
                  ) -> tuple[list[Example], dict]:
    """``examples`` without the contaminated ones, and the record: how many were checked and dropped, per
    evaluation task, and a few (generated question, evaluation task, evaluation id) of the dropped ones."""
    clean: list[Example] = []
    rec: dict = {"checked": 0, "dropped": 0, "by_eval_task": {}, "samples": []}
    for ex in examples:
        rec["checked"] += 1
        hit = index.match(example_text(ex))
        if hit is None:
            clean.append(ex)
            continue
        rec["dropped"] += 1
        rec["by_eval_task"][hit[0]] = rec["by_eval_task"].get(hit[0], 0) + 1
        if len(rec["samples"]) < n_samples:
            rec["samples"].append({"question": ex.question[:200], "eval_task": hit[0], "eval_id": hit[1]})
    return clean, rec


def shingles(text: str, k: int = 3) -> set[tuple[str, ...]]:
    """Word k-shingles of ``text``; a text shorter than k words is one shingle of all its words."""
    ws = words(text)
    return ngrams(ws, k) if len(ws) >= k else {tuple(ws)}


def drop_near_duplicates(examples: Sequence[Example], threshold: float, reference: Sequence[Example] = (),
                         k: int = 3) -> tuple[list[Example], int]:
    """``examples`` in order without those whose shingle Jaccard similarity to an earlier kept example, or
    to any of ``reference``, is ≥ ``threshold``; and how many were dropped. ``threshold`` > 1 keeps all."""
    if threshold <= 0:
        raise ValueError(f"the near-duplicate threshold must be > 0 (above 1: off), got {threshold}")
    if threshold > 1:
        return list(examples), 0
    sets: list[set] = []
    where: dict[tuple[str, ...], list[int]] = {}

    def add(s: set) -> None:
        for g in s:
            where.setdefault(g, []).append(len(sets))
        sets.append(s)

    for ex in reference:
        add(shingles(example_text(ex), k))
    kept, dropped = [], 0
    for ex in examples:
        s = shingles(example_text(ex), k)
        shared: dict[int, int] = {}
        for g in s:
            for j in where.get(g, ()):
                shared[j] = shared.get(j, 0) + 1
        if any(c / (len(s) + len(sets[j]) - c) >= threshold for j, c in shared.items()):
            dropped += 1
            continue
        add(s)
        kept.append(ex)
    return kept, dropped
