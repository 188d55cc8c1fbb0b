"""What a run's methods share: data split over clients, the models, evaluation, metrics and checkpoints.

``Env`` is built once per run. Models load lazily (a method that needs no LLM never loads one). The SLM
is a single peft model: simulated clients and the server set their adapter weights into it in turn, so
memory grows with the adapter, not the model, per client.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedkt import progress
from fedkt.config import ExperimentConfig
from fedkt.data.partition import partition, split_aux, subsample
from fedkt.data.tasks import Example, load_jsonl, load_task
from fedkt.evaluate import evaluate_tasks
from fedkt.federation import ClientContext, LocalFederation
from fedkt.models import add_lora, get_adapter_state, load_model, set_adapter_state


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any parts (config seed, round, client id, purpose)."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def load_client_data(cfg: ExperimentConfig) -> tuple[list[list[Example]], list[Example]]:
    """Clients' private training sets and the server's auxiliary set (disjoint, seeded)."""
    d, p = cfg.data, cfg.partition
    if p.scheme == "files":
        clients = [load_jsonl(f, task=d.tasks[0] if d.tasks else "custom", on_bad_line=d.on_bad_line)
                    for f in p.files]
        pooled = [e for c in clients for e in c]
        aux = []
        if p.aux_size:
            aux = [e for t in d.tasks for e in load_task(t, d.train_split, d.dir, d.on_bad_line)]
            aux = subsample(aux, p.aux_size, derive_seed(cfg.seed, "aux"))
            ids = {(e.task, e.id) for e in pooled}
            aux = [e for e in aux if (e.task, e.id) not in ids]
        return clients, aux
    pooled: list[Example] = []
    for t in d.tasks:
        rows = load_task(t, d.train_split, d.dir, d.on_bad_line)
        pooled += subsample(rows, d.max_train_examples, derive_seed(cfg.seed, "train", t))
    rest, aux = split_aux(pooled, p.aux_size, derive_seed(cfg.seed, "aux"))
    return partition(rest, p.num_clients, p.scheme, derive_seed(cfg.seed, "partition"), p.alpha, p.key), aux


def load_eval_sets(cfg: ExperimentConfig) -> dict[str, list[Example]]:
    return {t: subsample(load_task(t, cfg.data.eval_split, cfg.data.dir, cfg.data.on_bad_line),
                         cfg.eval.limit, derive_seed(cfg.seed, "eval", t))
            for t in cfg.eval_tasks}


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


@dataclass
class Env:
    cfg: ExperimentConfig
    out: Path
    clients_data: list[list[Example]] = field(default_factory=list)
    aux: list[Example] = field(default_factory=list)
    eval_sets: dict[str, list[Example]] = field(default_factory=dict)
    _slm: Any = None
    _llm: Any = None

    @classmethod
    def build(cls, cfg: ExperimentConfig, out: Path) -> "Env":
        if cfg.model.threads:
            torch.set_num_threads(cfg.model.threads)
        env = cls(cfg, out)
        env.clients_data, env.aux = load_client_data(cfg)
        env.eval_sets = load_eval_sets(cfg)
        return env

    # -- models ------------------------------------------------------------------------------------
    def _load(self, spec: str, purpose: str):
        t0 = time.perf_counter()
        model, tok = load_model(spec, self.cfg.model.dtype)
        model = add_lora(model, self.cfg.lora, seed=derive_seed(self.cfg.seed, "lora", purpose))
        init = get_adapter_state(model)
        progress.log(f"loaded {purpose} {spec} in {time.perf_counter() - t0:.1f}s")
        return model, tok, init

    @property
    def slm(self):
        """(peft model, tokenizer, initial adapter state) of the clients' SLM."""
        if self._slm is None:
            self._slm = self._load(self.cfg.model.slm, "slm")
        return self._slm

    @property
    def llm(self):
        if self._llm is None:
            if not self.cfg.model.llm:
                raise ValueError("this method needs a server LLM: set model.llm")
            self._llm = self._load(self.cfg.model.llm, "llm")
        return self._llm

    @property
    def has_llm(self) -> bool:
        return bool(self.cfg.model.llm)

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, which: str, state: dict[str, torch.Tensor] | None, desc: str) -> dict[str, dict]:
        model, tok, init = self.slm if which == "slm" else self.llm
        set_adapter_state(model, init if state is None else state)
        return evaluate_tasks(model, tok, self.eval_sets, self.cfg.eval.batch_size, self.cfg.eval.max_new_tokens,
                              desc=f"{desc} {which}")

    # -- federation --------------------------------------------------------------------------------
    def federation(self, handlers: dict, method: str) -> LocalFederation:
        model, tok, init = self.slm
        shared = {"model": model, "tok": tok, "init_adapter": init, "cfg": self.cfg,
                  "eval_sets": self.eval_sets}
        contexts = [ClientContext(cid=f"client{i}", data=data, shared=shared,
                                  workdir=self.out / "clients" / f"client{i}" / method)
                    for i, data in enumerate(self.clients_data)]
        return LocalFederation(contexts, handlers, on_failure=self.cfg.federation.on_client_failure)

    # -- logging -----------------------------------------------------------------------------------
    def log_metrics(self, **row: Any) -> None:
        row = {"time": round(time.time(), 3), **row}
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


class Checkpoints:
    """Per-round checkpoints of one method: ``checkpoints/METHOD/round_NNN/`` holding tensors
    (``NAME.safetensors``) and ``state.json``, written last so a directory with it is complete."""

    def __init__(self, out: Path, method: str):
        self.root = out / "checkpoints" / method

    def save(self, round: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        d = self.root / f"round_{round:03d}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for name, sd in tensors.items():
            save_file({k: v.contiguous() for k, v in sd.items()}, str(d / f"{name}.safetensors"))
        write_json_atomic(d / "state.json", {"round": round, **state})

    def latest(self) -> tuple[int, dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
        from safetensors.torch import load_file

        done = sorted(p for p in self.root.glob("round_*") if (p / "state.json").is_file())
        if not done:
            return None
        d = done[-1]
        state = json.loads((d / "state.json").read_text())
        tensors = {p.stem: load_file(str(p)) for p in d.glob("*.safetensors")}
        return state["round"], tensors, state
