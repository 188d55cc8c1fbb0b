"""The server side of a run: its config, its own data and models, evaluation, metrics, adapter saving.

A method's server procedure (or round step) sees a :class:`ServerContext` and the :class:`Federation`
it opens with :meth:`ServerContext.federation`; it never sees a client object. Models load lazily (a
method that needs no LLM never loads one) and are the server's own copies, distinct from any client's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from fedkt import progress
from fedkt.text_generators import HFGenerator, TextGenerator, is_remote, make_generator
from fedkt.clients import lora_seed
from fedkt.config import ExperimentConfig
from fedkt.data.tasks import Example
from fedkt.evaluate import evaluate_tasks
from fedkt.metrics_export import MetricsExporter
from fedkt.models import LoadedModel, load_lora_model, save_adapter
from fedkt.run_results import Correct, ids_fingerprint, question_ids

if TYPE_CHECKING:
    from fedkt.federation.base import Federation
    from fedkt.registry import MethodSpec

FederationFactory = Callable[["MethodSpec"], "Federation"]


@dataclass
class ServerContext:
    cfg: ExperimentConfig
    out: Path
    open_federation: FederationFactory
    """Given by the runtime: opens a federation whose clients answer a method's handlers."""
    aux: list[Example] = field(default_factory=list)
    """The server's own auxiliary (public) data."""
    eval_sets: dict[str, list[Example]] = field(default_factory=dict)
    pooled_client_data: Callable[[], list[Example]] | None = None
    """Only in simulation: the union of the clients' data, for the centralized upper bound."""
    _models: dict[str, LoadedModel] = field(default_factory=dict)
    _exporter: MetricsExporter | None = None

    # -- models --------------------------------------------------------------------------------------
    def model(self, role: str) -> LoadedModel:
        """The server's ``"slm"`` or ``"llm"`` (loaded on first use, with a fresh LoRA adapter)."""
        if role not in self._models:
            spec = self.cfg.model.slm if role == "slm" else self.cfg.model.llm
            if not spec:
                raise ValueError("this method needs a server LLM: set model.llm")
            t0 = time.perf_counter()
            self._models[role] = load_lora_model(spec, self.cfg.model.placement(role), self.cfg.lora,
                                                  lora_seed(self.cfg.seed, role), role=role)
            progress.log(f"loaded {role} {spec} in {time.perf_counter() - t0:.1f}s")
        return self._models[role]

    @property
    def slm(self) -> LoadedModel:
        return self.model("slm")

    @property
    def llm(self) -> LoadedModel:
        return self.model("llm")

    @property
    def has_llm(self) -> bool:
        return bool(self.cfg.model.llm)

    @property
    def llm_is_remote(self) -> bool:
        """The LLM is an ``openai:`` server: it writes text, but its weights, likelihoods and embeddings are
        out of reach (scoring, embedding and training need a local model)."""
        return is_remote(self.cfg.model.llm)

    def generator(self, batch_size: int = 16) -> TextGenerator:
        """The server LLM as a text generator, for every method that asks it for text (FedCoT's rationales,
        FDKT's filter and augmentation): the ``openai:`` server, or the local LLM with its initial adapter."""
        spec = self.cfg.model.llm
        if self.llm_is_remote:
            return make_generator(spec, batch_size=batch_size)
        return HFGenerator(self.llm.use(None), self.llm.tokenizer, batch_size=batch_size, name=spec, desc="server LLM")

    def loaded_models(self) -> dict[str, LoadedModel]:
        return dict(self._models)

    # -- federation, evaluation, outputs ---------------------------------------------------------------
    def federation(self, method: "MethodSpec") -> "Federation":
        return self.open_federation(method)

    def client_data(self) -> list[Example]:
        if self.pooled_client_data is None:
            raise RuntimeError("the clients' pooled data exists only in simulation (centralized baseline)")
        return self.pooled_client_data()

    def evaluate(self, role: str, state: dict[str, torch.Tensor] | None, desc: str) -> dict[str, dict]:
        """Metrics per task of the server's ``role`` model with adapter ``state`` (None: the initial one)."""
        return self.evaluate_questions(role, state, desc)[0]

    def evaluate_questions(self, role: str, state: dict[str, torch.Tensor] | None, desc: str
                           ) -> tuple[dict[str, dict], Correct | None]:
        """:meth:`evaluate` and its per-question correctness (None where ``eval.per_question`` is off)."""
        m = self.model(role)
        correct: Correct | None = {} if self.cfg.eval.per_question else None
        metrics = evaluate_tasks(m.use(state), m.tokenizer, self.eval_sets, self.cfg.eval.batch_size,
                                 self.cfg.eval.max_new_tokens, desc=f"{desc} {role}", correct=correct,
                                 precision=self.cfg.eval.precision)
        return metrics, correct

    def questions(self) -> dict[str, list[str]] | None:
        """task -> the evaluation questions' ids in scoring order (results.json's ``questions``)."""
        if not self.cfg.eval.per_question:
            return None
        return {t: question_ids(exs) for t, exs in self.eval_sets.items()}

    def client_correct(self, replies: dict[str, Any]) -> dict[str, Correct] | None:
        """The per-question correctness the clients' replies carry (``meta.correct``), client -> Correct.
        A client whose bit-strings are for other questions than the server's evaluation sets (its ids'
        fingerprint or count differs: another eval config) is left out, with a log line naming it; so is,
        with its own line, a client that sent metrics without them (its policy withholds them:
        ``policy.allow_per_question``). The report leaves a method without every client's out of its paired
        tables and names the clients (``report_paired.lacking_clients``)."""
        out: dict[str, Correct] = {}
        for cid, r in replies.items():
            got = r.meta.get("correct")
            if not got:
                if self.cfg.eval.per_question and "metrics" in r.meta:
                    progress.log(f"{cid}: sent its metrics without per-question correctness (its policy withholds "
                                 "them unless policy.allow_per_question = true): this method stays out of the "
                                 "paired statistics, and report.md names this client")
                continue
            bad = [t for t, exs in self.eval_sets.items()
                   if t not in got or got[t].get("ids") != ids_fingerprint(question_ids(exs))
                   or any(len(v) != len(exs) for k, v in got[t].items() if k != "ids")]
            if bad:
                progress.log(f"{cid}: its per-question correctness is for other questions of {', '.join(bad)} "
                             "than the server's evaluation sets (check eval.limit, data.dir and seed on that "
                             "client); left out of the paired statistics")
                continue
            out[cid] = {t: got[t] for t in self.eval_sets}
        return out or None

    def save_adapter(self, role: str, state: dict[str, torch.Tensor], method: str) -> Path:
        path = self.out / "adapters" / method / role
        save_adapter(self.model(role).model, state, path)
        return path

    def log_metrics(self, **row: Any) -> None:
        """Append ``row`` to metrics.jsonl (the source) and mirror it to the ``[metrics]`` exporters."""
        row = {"time": round(time.time(), 3), **row}
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._exporter is None:
            self._exporter = MetricsExporter.for_run(self.cfg, self.out)
        self._exporter.export(row)

    def close_exports(self) -> None:
        """Close the metrics exporters (flush TensorBoard, mark the MLflow runs finished)."""
        if self._exporter is not None:
            self._exporter.close()
            self._exporter = None
