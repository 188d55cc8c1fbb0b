"""Paired differences of each method against its baselines, from results.json's per-question correctness.

Every method of a run is scored on the same questions (``questions`` in results.json), so two methods are
*paired*: :mod:`fedkt.paired` turns their per-question correctness into an accuracy difference with a 95%
paired-bootstrap interval and McNemar's exact p. This module picks the comparisons and renders them:

* which pairs: every method against every baseline of :data:`BASELINES` the run holds (zero-shot, standalone,
  FedAvg, centralized); among the baselines, only the later one against the earlier (FedAvg − Zero-shot,
  not also Zero-shot − FedAvg);
* a method's per-question value (:func:`per_question`): 0/1 from the server's evaluation (``correct``); where
  the clients evaluated their own SLMs (Standalone, FDKT, FedCoT's paper mode: ``per_client_correct``), the
  share of clients that got the question right (0, 1/k, ..., 1): its mean is exactly the mean-over-clients
  accuracy of the tables, and McNemar's test becomes its version for clustered matched pairs
  (:func:`fedkt.paired.clustered_mcnemar_p`: the questions as clusters, the clients as members). Only when
  *every* client that reported metrics sent its correctness: a deployed client withholds it unless its own
  policy allows it (``policy.allow_per_question``), and a share over the clients that did send would not be
  the table's accuracy, so such a method is left out of the paired tables and :func:`missing` names the
  clients without it (:func:`lacking_clients`);
* per task, and over all tasks together ("All": every question of every task, the bootstrap resampling
  within each task);
* over several runs (seeds): the same, pooled (the bootstrap resamples within each run and task; McNemar /
  the sign test counts the questions of all runs), each run's two methods aligned on their question ids.
"""

from __future__ import annotations

from typing import Sequence

from fedkt import registry
from fedkt.paired import PairedDifference, pool
from fedkt.run_results import RunResults, ids_fingerprint, unbits

BASELINES = ("zero_shot", "standalone", "fedavg", "centralized")
"""The methods every other method is compared against, in this order (a baseline is compared only with the
baselines before it)."""
METRIC = "acc"
N_BOOT = 4000
"""Bootstrap resamples per cell (the interval's ends move by ~0.1 point between seeds of the resampling at
500 questions)."""
TASK_NAMES = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "openbookqa": "OBQA",
              "commonsense_qa": "CQA", "gsm8k": "GSM8K"}
NO_DATA = ("Paired differences: not shown — this results.json holds no per-question correctness (written by a "
           "fedkt before it recorded it, or with eval.per_question = false); rerun to get them.")
WITHHELD = ("a client sends per-question correctness only where its own policy allows it: policy.allow_per_question "
            "= true in its client file (a deployed client's default is false; the simulation's clients follow "
            "eval.per_question)")


def _values(bits_by_source: list[dict], task: str, ids: list[str]) -> list[float] | None:
    """Mean over the sources (clients; one for a server evaluation) of each question's 0/1, or None where a
    source lacks the task or scored other questions."""
    rows = []
    for c in bits_by_source:
        x = c.get(task)
        if not x or METRIC not in x or x.get("ids") != ids_fingerprint(ids) or len(x[METRIC]) != len(ids):
            return None
        rows.append(unbits(x[METRIC]))
    if not rows:
        return None
    return [sum(col) / len(rows) for col in zip(*rows)]


def per_question(results: RunResults, method: str, role: str, round: int | None = None
                 ) -> dict[str, dict[str, float]] | None:
    """task -> {question id: value} of ``method``'s ``role`` (its final evaluation, or round ``round``'s): 0/1,
    or the share of clients right where the clients evaluated; None where the run holds no per-question
    data for it. With :func:`fedkt.paired.pool` this compares any two evaluations of a run, e.g. FedCoLLM's
    round 2 with FedAvg's final one."""
    r = results.methods.get(method)
    questions = results.questions
    if r is None or not questions:
        return None
    if round is None:
        correct, per_client, has_role = r.correct, r.per_client_correct, role in r.metrics
    else:
        entry = next((e for e in r.per_round or [] if e.get("round") == round), None)
        if entry is None:
            return None
        correct, per_client, has_role = entry.get("correct"), entry.get("per_client_correct"), role in entry
    if correct and role in correct:
        sources = [correct[role]]
    elif role == "slm" and per_client and has_role and not set(_evaluated_clients(r, round)) - set(per_client):
        sources = list(per_client.values())
    else:  # (a client-evaluated method some of whose clients sent no correctness: lacking_clients names them)
        return None
    out = {}
    for task, ids in questions.items():
        v = _values(sources, task, ids)
        if v is not None:
            out[task] = dict(zip(ids, v))
    return out or None


def _evaluated_clients(r, round: int | None = None) -> list[str]:
    """The clients whose own evaluation of ``r``'s SLM the server recorded (final, or round ``round``'s)."""
    if round is None and r.per_client:
        return list(r.per_client)
    entries = [e for e in r.per_round or [] if round is None or e.get("round") == round]
    entry = next((e for e in reversed(entries) if "per_client" in e), None)
    return list(entry["per_client"]) if entry else []


def lacking_clients(results: RunResults, method: str) -> list[str]:
    """The clients that reported metrics of ``method``'s final evaluation but no per-question correctness the
    server kept (withheld by their policy, or scored on other questions), where the run records per-question
    data and the clients evaluated; [] otherwise."""
    r = results.methods.get(method)
    if r is None or not results.questions or (r.correct and "slm" in r.correct):
        return []
    have = r.per_client_correct or {}
    return sorted(set(_evaluated_clients(r)) - set(have))


def _align(a: dict[str, float], b: dict[str, float]) -> tuple[list[float], list[float]]:
    ids = [i for i in a if i in b]
    return [a[i] for i in ids], [b[i] for i in ids]


def comparisons(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(method, baseline) pairs among ``methods`` in registry order."""
    rank = {m: i for i, m in enumerate(registry.methods())}
    order = sorted(methods, key=lambda m: rank.get(m, len(rank)))
    out = []
    for m in order:
        for b in BASELINES:
            if b == m or b not in methods:
                continue
            if m in BASELINES and BASELINES.index(b) > BASELINES.index(m):
                continue
            out.append((m, b))
    return out


def paired_cells(runs: Sequence[RunResults], method: str, baseline: str, role: str, tasks: Sequence[str]
                 ) -> tuple[dict[str, PairedDifference], int]:
    """task (and "all") -> the pooled paired difference of method − baseline over ``runs``, and how many runs
    held both."""
    strata: dict[str, list[tuple[list[float], list[float]]]] = {t: [] for t in tasks}
    used = 0
    for run in runs:
        a, b = per_question(run, method, role), per_question(run, baseline, role)
        if not a or not b:
            continue
        used += 1
        for t in tasks:
            if t in a and t in b:
                pair = _align(a[t], b[t])
                if pair[0]:
                    strata[t].append(pair)
    out = {t: pool(s, n_boot=N_BOOT) for t, s in strata.items() if s}
    every = [p for t in tasks for p in strata[t]]
    if every and len(out) == len(tasks):
        out["all"] = pool(every, n_boot=N_BOOT)
    return out, used


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def cell(d: PairedDifference | None) -> str:
    if d is None:
        return "–"
    s = f"{100 * d.diff:+.1f} [{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}] p={_p(d.p_mcnemar)}"
    return f"**{s}**" if d.significant() else s


def paired_table(runs: Sequence[RunResults], role: str, tasks: Sequence[str]) -> str:
    """Markdown rows "method − baseline | per task | All" for one role (one run, or several pooled)."""
    methods = {m for r in runs for m in r.methods if per_question(r, m, role)}
    lines = []
    for m, b in comparisons(sorted(methods)):
        cells, used = paired_cells(runs, m, b, role, tasks)
        if not cells:
            continue
        runs_note = f" (n={used})" if len(runs) > 1 and used < len(runs) else ""
        lines.append(f"| {registry.label(m)} − {registry.label(b)}{runs_note} | "
                     + " | ".join(cell(cells.get(t)) for t in tasks) + f" | {cell(cells.get('all'))} |")
    if not lines:
        return ""
    head = "| Difference | " + " | ".join(TASK_NAMES.get(t, t) for t in tasks) + " | All |"
    return "\n".join([head, "|---" * (len(tasks) + 2) + "|", *lines])


def explanation(n_runs: int = 1) -> str:
    pooled = ("Pooled over the runs: the bootstrap resamples questions within each run and task, McNemar counts "
              "the discordant questions of all runs. " if n_runs > 1 else "")
    return ("Accuracy difference in points (method − baseline, `acc`), its 95% paired-bootstrap interval "
            f"({N_BOOT} resamples of the questions) and McNemar's exact p; bold: the interval excludes 0. "
            f"{pooled}All: every question of every task together (each task resampled within itself). Where the "
            "clients evaluate their own SLMs (Standalone, FDKT, FedCoT's paper mode) a question counts as the "
            "share of clients that get it right (its mean is the table's mean over clients), and p is McNemar's "
            "test for clustered matched pairs (Durkalski et al. 2003: X² = (Σd)²/Σd² over the per-question "
            "differences d). docs/results.md.")


def _clients_note(runs: Sequence[RunResults]) -> str:
    """"Method: client, client; …" of the methods whose clients evaluated but did not all send correctness."""
    by_method: dict[str, set[str]] = {}
    for r in runs:
        for m in r.methods:
            by_method.setdefault(m, set()).update(lacking_clients(r, m))
    rank = {m: i for i, m in enumerate(registry.methods())}
    return "; ".join(f"{registry.label(m)}: {', '.join(sorted(c))}"
                     for m, c in sorted(by_method.items(), key=lambda kv: rank.get(kv[0], len(rank))) if c)


def missing(runs: Sequence[RunResults]) -> str:
    """One line naming the methods without per-question data, and the clients that sent none (or saying
    that no run has any)."""
    have = {(i, m) for i, r in enumerate(runs) for m in r.methods
            if any(per_question(r, m, role) for role in ("slm", "llm"))}
    clients = _clients_note(runs)
    withheld = (f" Without per-question correctness from every client (a paired difference over the others "
                f"would not be the table's accuracy) — {clients}; {WITHHELD}." if clients else "")
    if not have:
        if clients:
            return "Paired differences: not shown — no method has per-question correctness." + withheld
        return NO_DATA
    lacking = sorted({m for i, r in enumerate(runs) for m, res in r.methods.items()
                      if (i, m) not in have and res.metrics})
    if lacking:
        return ("Not in the paired tables (no per-question correctness recorded"
                + (" in some runs" if len(runs) > 1 else "") + "): "
                + ", ".join(registry.label(m) for m in lacking) + "." + withheld)
    return ""


def section(runs: Sequence[RunResults], tasks: Sequence[str], level: str = "##") -> str:
    """The paired-differences section: one table per role and the explanation, or the line saying why not."""
    tables = {role: paired_table(runs, role, tasks) for role in ("llm", "slm")}
    parts = [f"{level} Paired differences", ""]
    for role, title in (("llm", "Server LLM"), ("slm", "Client SLMs")):
        if tables[role]:
            parts += [f"{level}# {title}", "", tables[role], ""]
    note = missing(runs)
    if note.startswith("Paired differences: not shown"):
        return note + "\n"
    if any(tables.values()):
        parts += [explanation(len(runs)), ""]
    else:
        parts += ["No method with per-question correctness has a baseline of the run to be compared with.", ""]
    if note:
        parts += [note, ""]
    return "\n".join(parts)
