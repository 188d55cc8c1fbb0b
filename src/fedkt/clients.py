"""The client side: what a client is built from, what its handlers see, and what survives between calls.

A client is built by a :class:`ClientFactory` from its own :class:`ClientSpec` (its model, LoRA settings,
its private data, its training and evaluation settings): nothing of the server's is reachable from it.
Handlers are plain functions ``handler(ctx: ClientContext, msg: Message) -> Message``.

* In-process simulation: the partitioner hands each simulated client its shard (``ClientSpec.examples``)
  and :class:`ClientFactory` shares one frozen base model among all simulated clients with the same
  model spec (each client sets its own adapter into it before use), so memory grows with the adapter,
  not the model, per client.
* Real deployment: each client reads its own files (``ClientSpec.data_files``) and loads its own model.

Client state that must survive between calls (adapter, optimizer or accountant state, a privacy kit)
lives in :class:`StateStore`; a runtime that rebuilds clients per message (Flower) persists it with
``to_bytes``/``from_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fedkt.config import EvalConfig, LoraSettings, Placement, TrainConfig
from fedkt.data.prompts import with_format
from fedkt.data.tasks import Example, load_jsonl
from fedkt.message import Message, decode, encode
from fedkt.models import LoadedModel, load_lora_model
from fedkt.privacy.policy import ClientPolicy
from fedkt.privacy.randomness import PinnedRandom, SecureRandom, check_secret_seed
from fedkt.seeds import derive_seed


@dataclass
class ClientSpec:
    """Everything a client is built from; serialisable (JSON) except the in-process ``examples``."""

    cid: str
    model: str
    """The client's SLM spec (``builtin:NAME``, a directory, a ``.gguf`` file)."""
    dtype: str = "float32"
    device: str = "cpu"
    """Device/precision of the client's SLM (``[model]`` keys; "auto" resolves on the client's machine)."""
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    """The experiment seed; handlers derive per-purpose seeds from it (``derive_seed(seed, ...)``)."""
    examples: list[Example] | None = None
    """The client's private training data, handed over in-process by the partitioner."""
    data_files: list[str] = field(default_factory=list)
    """Or: JSONL files the client reads itself (a real deployment)."""
    data_task: str = "custom"
    eval_sets: dict[str, list[Example]] = field(default_factory=dict)
    """Evaluation data the client scores locally (standalone baseline)."""
    workdir: Path | None = None
    secret_seed: int | str | None = None
    """The client's own pinned secret seed (≥ 64 bits: a hex string of ≥ 16 digits or an int ≥ 2**63),
    making its privacy noise reproducible by whoever holds it; None: a deployed client draws its privacy
    noise from the OS CSPRNG (see ClientContext.secret_rng)."""
    policy: ClientPolicy = field(default_factory=ClientPolicy)
    """What this client accepts from the server (fedkt.privacy.policy; safe defaults)."""
    simulation: bool = False
    """Built by the in-process simulator: privacy randomness is derived from the experiment seed (known to
    the server; reproducible) and labelled so. Never true for a deployed client."""


class StateStore:
    """Per-client state that survives between calls: JSON values and named tensor dicts."""

    def __init__(self):
        self.values: dict[str, Any] = {}
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self.values or key in self.tensors

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def to_bytes(self) -> bytes:
        flat = {f"{name}/{k}": v for name, sd in self.tensors.items() for k, v in sd.items()}
        return encode(Message(tensors=flat, meta={"values": self.values, "groups": sorted(self.tensors)}))

    @classmethod
    def from_bytes(cls, data: bytes) -> "StateStore":
        msg = decode(data)
        store = cls()
        store.values = msg.meta["values"]
        store.tensors = {g: {} for g in msg.meta["groups"]}
        for key, v in msg.tensors.items():
            g, k = key.split("/", 1)
            store.tensors[g][k] = v
        return store


@dataclass
class ClientContext:
    """What a client handler sees: its own model, data, settings, state and workdir."""

    cid: str
    slm: LoadedModel | None = None
    """The client's SLM (None for clients of methods that need no model, e.g. in runtime tests)."""
    data: list[Example] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    eval_sets: dict[str, list[Example]] = field(default_factory=dict)
    state: StateStore = field(default_factory=StateStore)
    workdir: Path | None = None

    secret_seed: int | str | None = None
    """Seeds randomness whose secrecy a privacy guarantee rests on (text-DP sampling, DP-SGD noise). A
    deployed client pins its own (ClientSpec.secret_seed, ≥ 64 bits) or, without one, draws from the OS
    CSPRNG; in simulation it derives from the config seed, which keeps runs reproducible but is known to
    the server: simulation only."""
    policy: ClientPolicy = field(default_factory=ClientPolicy)
    simulation: bool = False

    def seed_for(self, *purpose: Any) -> int:
        """A seed for one purpose of this client (e.g. ``ctx.seed_for("fit", round)``)."""
        return derive_seed(self.seed, *purpose, self.cid)

    @property
    def randomness(self) -> str:
        """Where this client's privacy noise comes from: "simulation", "secret_seed" or "csprng"."""
        if self.secret_seed is not None:
            return "secret_seed"
        return "simulation" if self.simulation else "csprng"

    def secret_rng(self, *purpose: Any):
        """The source of one purpose's privacy-relevant draws (``fedkt.privacy.randomness``): in simulation
        the derived int seed of before (bit-identical runs), with a pinned ``secret_seed`` a
        :class:`PinnedRandom` (64-bit seeds), else a :class:`SecureRandom` (the OS CSPRNG)."""
        mode = self.randomness
        if mode == "simulation":
            return derive_seed(derive_seed(self.seed, "secret", self.cid), *purpose)
        if mode == "secret_seed":
            return PinnedRandom(check_secret_seed(self.secret_seed), self.cid, *purpose)
        return SecureRandom()

    def secret_seed_for(self, *purpose: Any) -> int:
        """An int seed for a privacy-relevant purpose: derived from the experiment seed in simulation, from
        the pinned secret (63 bits) or fresh from the OS CSPRNG otherwise."""
        rng = self.secret_rng(*purpose)
        return rng if isinstance(rng, int) else rng.int_seed()

    def save_state(self) -> None:
        """Persist the state store to the workdir (a resumed run finds it there)."""
        if self.workdir is not None and (self.state.values or self.state.tensors):
            self.workdir.mkdir(parents=True, exist_ok=True)
            tmp = self.workdir / "state.fkt.tmp"
            tmp.write_bytes(self.state.to_bytes())
            tmp.replace(self.workdir / "state.fkt")


Handler = Callable[[ClientContext, Message], Message]


def lora_seed(seed: int, role: str = "slm") -> int:
    """The seed a role's fresh LoRA adapter is drawn from: the same on the server and every client."""
    return derive_seed(seed, "lora", role)


class ClientFactory:
    """Builds :class:`ClientContext` objects from specs; loads each distinct base model once.

    ``share_base=True`` (in-process simulation) keeps one loaded model per (model, dtype, LoRA) and hands it
    to every client with that spec; a deployment builds one client per process anyway."""

    def __init__(self, share_base: bool = True):
        self.share_base = share_base
        self._models: dict[tuple, LoadedModel] = {}

    def load(self, spec: ClientSpec) -> LoadedModel:
        placement = Placement(spec.device, spec.dtype, spec.gradient_checkpointing, spec.load_in_4bit)
        key = (spec.model, placement, repr(spec.lora), spec.seed)
        if not self.share_base or key not in self._models:
            self._models[key] = load_lora_model(spec.model, placement, spec.lora, lora_seed(spec.seed))
        return self._models[key]

    def build(self, spec: ClientSpec) -> ClientContext:
        if spec.examples is not None:
            data = list(spec.examples)
        else:
            data = [e for f in spec.data_files for e in load_jsonl(f, task=spec.data_task)]
        # the experiment's prompt format (eval.format) for training and scoring alike, whoever loaded the data
        data = with_format(data, spec.eval)
        eval_sets = {t: with_format(exs, spec.eval) for t, exs in spec.eval_sets.items()}
        if spec.secret_seed is not None:
            check_secret_seed(spec.secret_seed)  # refuse a weak pinned seed before anything runs
        state = StateStore()
        if spec.workdir is not None and (spec.workdir / "state.fkt").is_file():
            state = StateStore.from_bytes((spec.workdir / "state.fkt").read_bytes())
        return ClientContext(cid=spec.cid, slm=self.load(spec), data=data, train=spec.train, eval=spec.eval,
                             seed=spec.seed, eval_sets=eval_sets, state=state, workdir=spec.workdir,
                             secret_seed=spec.secret_seed, policy=spec.policy, simulation=spec.simulation)
