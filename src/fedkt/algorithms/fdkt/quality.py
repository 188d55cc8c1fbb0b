"""FDKT's checks on the synthetic set beyond the LLM's filter (server side): the kept DP samples' answers
re-answered by the LLM, near-duplicates, and n-gram contamination with the evaluation sets.

* **Answers** (:func:`check_answers`). A kept DP sample's answer letter is the one its prefix asked the DP
  model for, which nobody checked (label noise). The server LLM scores each choice as evaluation does
  (``fedkt.evaluate.choice_loglikelihoods``: the task's prompt in the run's ``eval.format``, each choice as
  the continuation) and picks
  the choice of highest log-likelihood (``predictions``' ``acc`` pick). ``"relabel"``: that pick becomes the
  answer; ``"drop"``: samples whose letter is not the pick are dropped; ``"keep"``: no check.
* **Near-duplicates** and **contamination**: :mod:`fedkt.data.contamination`, applied by
  :func:`near_duplicates` and :func:`contamination` with their records.

Everything here reads DP samples and public evaluation questions only: post-processing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from fedkt.data.contamination import NgramIndex, decontaminate, drop_near_duplicates
from fedkt.data.tasks import Example
from fedkt.evaluate import choice_loglikelihoods, predictions


def answers_mode(mode: str, remote: bool) -> str:
    """``fdkt.kept_answers`` with "auto" resolved: "relabel" with a local LLM, "keep" with an ``openai:``
    server; "relabel" and "drop" need the LLM's likelihoods (a local LLM)."""
    if mode == "auto":
        return "keep" if remote else "relabel"
    if mode in ("relabel", "drop") and remote:
        raise ValueError(f"fdkt.kept_answers = {mode!r} scores each choice with the LLM's likelihoods and needs a "
                         f"local LLM; with an openai: server use 'keep' or 'auto' (the default synthetic_set = "
                         f"'augmented' trains on the LLM's own examples only)")
    return mode


def check_answers(model, tok, examples: Sequence[Example], mode: str, batch_size: int = 16
                  ) -> tuple[list[Example], dict]:
    """The examples with their answers checked by the LLM (``mode``: "relabel", "drop", "keep"), and the
    record: checked, agreed (the LLM's pick is the sample's letter), relabelled, dropped."""
    if mode not in ("relabel", "drop", "keep"):
        raise ValueError(f"answer check mode must be 'relabel', 'drop' or 'keep', got {mode!r}")
    rec = {"mode": mode, "checked": 0, "agreed": 0, "relabelled": 0, "dropped": 0}
    if mode == "keep" or not examples:
        return list(examples), rec
    lls = choice_loglikelihoods(model, tok, examples, batch_size=batch_size, desc="fdkt answers")
    out = []
    for ex, ll in zip(examples, lls):
        pick, _ = predictions(ex, ll)
        rec["checked"] += 1
        if pick == ex.answer:
            rec["agreed"] += 1
            out.append(ex)
        elif mode == "relabel":
            rec["relabelled"] += 1
            out.append(replace(ex, answer=pick, target=ex.choices[pick], label=str(pick)))
        else:
            rec["dropped"] += 1
    return out, rec


def near_duplicates(examples: Sequence[Example], threshold: float, reference: Sequence[Example] = ()
                    ) -> tuple[list[Example], int]:
    """``drop_near_duplicates`` (word-3-shingle Jaccard ≥ ``threshold``; above 1: off)."""
    return drop_near_duplicates(examples, threshold, reference)


def contamination(examples: Sequence[Example], index: NgramIndex | None, n_samples: int = 3
                  ) -> tuple[list[Example], dict]:
    """``examples`` without those overlapping an evaluation question (no index: the check is off)."""
    if index is None:
        return list(examples), {"checked": 0, "dropped": 0, "by_eval_task": {}, "samples": [], "off": True}
    return decontaminate(examples, index, n_samples)
