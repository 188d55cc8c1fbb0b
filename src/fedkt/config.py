"""Typed experiment configuration, loaded from TOML and validated with errors that name the key.

A config is a tree of dataclasses. ``load_config(path, overrides)`` reads a TOML file, applies
``--set section.key=value`` overrides and checks every key and value: an unknown key, a wrong type or
a value outside the allowed set raises :class:`ConfigError` naming the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

TASKS = ("arc_easy", "arc_challenge", "openbookqa", "commonsense_qa", "gsm8k")


class ConfigError(ValueError):
    """A configuration mistake; the message names the key and the allowed values."""


class FieldError(ConfigError):
    """Raised by a config dataclass's own ``__post_init__`` checks with a key relative to its section;
    :func:`from_dict` prefixes the section (``batch_size must be > 0`` -> ``train.batch_size must be > 0``)."""


PATH = {"path": True}
"""Field metadata of a file, directory or model key: a relative value read from a TOML file resolves
against that file's directory (``resolve_paths``); ``--set`` values stay relative to the working directory."""


def check(condition: bool, message: str) -> None:
    """For ``__post_init__`` validation: raise :class:`FieldError` with ``message`` unless ``condition``."""
    if not condition:
        raise FieldError(message)


def check_positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        check(v > 0, f"{n} must be > 0, got {v}")


@dataclass
class ModelConfig:
    slm: str = field(default="builtin:smollm2-135m", metadata=PATH)
    """The clients' small model: ``builtin:NAME``, a local HF directory, a ``.gguf`` file or ``hf:ORG/NAME``."""
    llm: str = field(default="", metadata=PATH)
    """The server's large model (FedCoLLM, centralized LLM baseline); same forms as ``slm``."""
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""
    # -- devices and precision (docs/devices.md); ``placement(role)`` resolves the per-role overrides --
    device: str = "auto"
    """Where the models compute: "auto" (cuda if available, else mps, else cpu), "cpu", "cuda", "cuda:N", "mps"."""
    dtype: Literal["auto", "bf16", "fp16", "fp32", "bfloat16", "float32"] = "auto"
    """Base weights' dtype; bf16/fp16 also run the training loop under autocast (fp16 with a grad scaler).
    "auto": bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on cpu/mps. LoRA adapters stay fp32."""
    llm_device: str = ""
    """The server LLM's device when it differs from ``device`` ("" = ``device``)."""
    llm_dtype: Literal["", "auto", "bf16", "fp16", "fp32", "bfloat16", "float32"] = ""
    """The server LLM's dtype when it differs from ``dtype`` ("" = ``dtype``)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, ~30% more compute); every role."""
    load_in_4bit: Literal["none", "llm", "all"] = "none"
    """QLoRA: 4-bit NF4 base weights (bitsandbytes, ``pip install fedkt[gpu]``, CUDA only) for the server
    LLM ("llm") or every model ("all")."""
    device_map: Literal["", "auto"] = ""
    """"auto": spread the server LLM over every visible GPU (accelerate), for an LLM larger than one GPU."""

    def __post_init__(self):
        for key in ("device", "llm_device"):
            v = getattr(self, key)
            check(bool(DEVICE_SPELLING.fullmatch(v)) or (key == "llm_device" and v == ""),
                  f"{key} = {v!r} is not a device; allowed: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"
                  + (" or '' (= device)" if key == "llm_device" else ""))

    def client_fields(self) -> dict[str, Any]:
        """The clients' ``ClientSpec`` device/precision fields (the SLM's placement)."""
        p = self.placement("slm")
        return {"device": p.device, "dtype": p.dtype, "gradient_checkpointing": p.gradient_checkpointing,
                "load_in_4bit": p.load_in_4bit}

    def placement(self, role: str) -> "Placement":
        """Where the ``"slm"`` (clients' and server's) or ``"llm"`` model lives, with the overrides applied."""
        llm = role == "llm"
        return Placement(device=(self.llm_device or self.device) if llm else self.device,
                         dtype=(self.llm_dtype or self.dtype) if llm else self.dtype,
                         gradient_checkpointing=self.gradient_checkpointing,
                         load_in_4bit=self.load_in_4bit == "all" or (llm and self.load_in_4bit == "llm"),
                         device_map=self.device_map if llm else "")


DEVICE_SPELLING = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")


@dataclass(frozen=True)
class Placement:
    """One role's device/precision settings, unresolved ("auto" is resolved on the machine that loads the model,
    by ``fedkt.devices``)."""

    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    device_map: str = ""


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        check_positive(self, "r")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(bool(self.target_modules), "target_modules must name at least one module")


@dataclass
class DataConfig:
    dir: str = field(default="", metadata=PATH)
    """Directory holding ``TASK/SPLIT.jsonl``; empty uses the data bundled with fedkt (ARC-Easy)."""
    tasks: list[str] = field(default_factory=lambda: ["arc_easy"])
    """Tasks whose training split forms the clients' private data."""
    eval_tasks: list[str] = field(default_factory=list)
    """Tasks to evaluate on; empty means the same as ``tasks``."""
    train_split: str = "train"
    eval_split: str = "test"
    max_train_examples: int = 0
    """Cap on training examples per task before partitioning (0 = all); a seeded subsample."""
    on_bad_line: Literal["error", "skip"] = "error"

    def __post_init__(self):
        for key, tasks in (("tasks", self.tasks), ("eval_tasks", self.eval_tasks)):
            for i, t in enumerate(tasks):
                check(t in TASKS, f"{key}[{i}] = {t!r} is not a task; allowed values: {', '.join(TASKS)}")


@dataclass
class PartitionConfig:
    num_clients: int = 4
    scheme: Literal["iid", "dirichlet", "files"] = "iid"
    alpha: float = 0.5
    """Dirichlet concentration (scheme = "dirichlet"); smaller is more skewed."""
    key: str = "answer"
    """Example field the Dirichlet split is taken over: "answer" (the gold choice index) or "task"."""
    files: list[str] = field(default_factory=list, metadata=PATH)
    """One JSONL file per client (scheme = "files")."""
    aux_size: int = 200
    """Examples held out of the training data as the server's auxiliary (public) set."""

    def __post_init__(self):
        check_positive(self, "num_clients", "alpha")
        check(self.aux_size >= 0, f"aux_size must be >= 0, got {self.aux_size}")


@dataclass
class TrainConfig:
    lr: float = 3e-4
    epochs: float = 1.0
    """Local epochs per round (standalone/centralized train ``epochs * rounds`` in total)."""
    max_steps: int = 0
    """If > 0, caps optimizer steps per training call (overrides epochs)."""
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = 1.0

    def __post_init__(self):
        check_positive(self, "batch_size", "grad_accum", "max_length", "lr")
        check(self.epochs > 0 or self.max_steps > 0, "epochs must be > 0 (or set train.max_steps)")


@dataclass
class EvalConfig:
    limit: int = 0
    """Seeded subsample of each eval split (0 = all)."""
    batch_size: int = 32
    """Sequences per forward pass (a multiple-choice question contributes one per choice)."""
    every_round: bool = True
    max_new_tokens: int = 256
    """GSM8K greedy generation budget."""

    def __post_init__(self):
        check_positive(self, "batch_size", "max_new_tokens")


@dataclass
class FederationConfig:
    rounds: int = 3
    on_client_failure: Literal["stop", "skip"] = "stop"
    """A failing client stops the run ("stop") or is reported and left out of the round ("skip")."""
    min_clients: int = 1
    """Under "skip": fewer replies than this in a call stop the run (the last checkpoint is kept)."""
    secure_aggregation: bool = False
    """FedAvg, FedProx, FedCoLLM and FedCoT average the clients' adapters by secure aggregation (Flower: SecAgg+; in
    process: the same mean, computed in the clear)."""
    timeout_s: float = 1800.0
    """Flower runtime: seconds to wait for a call's replies; a client that misses it failed (finite: > 0)."""
    round_deadline_s: float = 7200.0
    """Flower runtime: seconds from a round's first call after which its calls wait for nobody (finite: > 0)."""
    max_payload_mb: float = 2047.0
    """Flower runtime: payloads (either direction) above this many MiB are refused with an error."""
    secagg_min_clients: int = 3
    """Secure aggregation refuses to run over fewer clients (>= 3: with 2, each learns the other's update)."""
    secagg_reconstruction_threshold: float = 0.5
    """SecAgg+: shares needed to rebuild a secret (a fraction of the clients, or an integer count)."""
    secagg_max_weight: float = 1000.0
    """SecAgg+: the largest client weight (examples) expected; weights are scaled by it before quantisation."""
    secagg_clipping_range: float = 8.0
    """SecAgg+: (weight-scaled) update values are clipped to [-c, c] before quantisation."""
    secagg_quantization_range: int = 2**22
    """SecAgg+: quantisation levels over [-c, c] (grid step 2c/q; the per-round error bound is reported)."""
    secagg_modulus_range: int = 2**32
    """SecAgg+: the masking modulus (a power of two, >= clients x quantization range)."""

    def __post_init__(self):
        check_positive(self, "rounds", "min_clients", "max_payload_mb", "secagg_reconstruction_threshold",
                       "secagg_max_weight", "secagg_clipping_range", "secagg_quantization_range")
        for key in ("timeout_s", "round_deadline_s"):
            v = getattr(self, key)
            check(v > 0 and v != float("inf"), f"federation.{key} must be a finite number of seconds > 0, got {v} "
                  "(0 no longer means 'wait for ever': a hung client would stall the run)")
        check(self.secagg_min_clients >= 3,
              f"secagg_min_clients = {self.secagg_min_clients}: secure aggregation needs at least 3 clients "
              "(with 2, each client learns the other's update from the mean); raise it to 3 or more")
        q, m = self.secagg_quantization_range, self.secagg_modulus_range
        check(q <= 2**30, f"secagg_quantization_range = {q} must be <= 2^30 (SecAgg+ rounds into int32)")
        check(m >= 2 * q and m <= 2**62 and m & (m - 1) == 0,
              f"secagg_modulus_range = {m} must be a power of two in [2 x secagg_quantization_range, 2^62]")


@dataclass
class DeriveConfig:
    parent: str = field(default="builtin:smollm2-135m", metadata=PATH)
    out: str = field(default="", metadata=PATH)
    layers: list[int] = field(default_factory=list)
    """Explicit parent layer indices to keep; empty uses ``num_layers``."""
    num_layers: int = 9
    strategy: Literal["spread", "first", "ends", "importance"] = "ends"
    """How ``num_layers`` are chosen: "importance" keeps the blocks that change their input most (block
    influence 1 - cos(h_in, h_out) on the healing text, as ShortGPT), "ends" the bottom ceil(n/2) and top
    floor(n/2) blocks, "spread" evenly spaced, "first" the bottom n."""
    steps: int = 400
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 5e-4
    temperature: float = 2.0
    num_prompts: int = 256
    """Texts generated by the parent to heal on."""
    gen_tokens: int = 96
    rank: int = 0
    """0: heal every weight of the kept blocks. r > 0: heal through a rank-r update of every linear layer
    (and the norms), merged exactly; the delta (a few MB) rebuilds the model bit for bit (derive_delta)."""
    task_texts: str = ""
    """Optional task text mixed into the healing text: comma-separated JSONL files or task names (each
    ``name`` or ``name:split``; ``task_split`` by default). Never the clients' data."""
    task_split: str = "validation"
    data_dir: str = field(default="", metadata=PATH)
    """Where task names are read from (empty: fedkt's bundled data, then ``../shared/assets/data``)."""
    task_fraction: float = 0.5
    eval_texts: int = 32
    checkpoint_every: int = 50
    seed: int = 0
    """Seeds the healing prompts, their sampling, the task-text mix and the batch order."""

    def __post_init__(self):
        check_positive(self, "num_layers", "batch_size", "seq_len", "lr", "temperature", "num_prompts",
                       "gen_tokens", "checkpoint_every")
        check(self.steps >= 0, f"steps must be >= 0 (0 = no healing), got {self.steps}")
        check(self.rank >= 0, f"rank must be >= 0 (0 = heal every weight), got {self.rank}")
        check(0 <= self.task_fraction < 1, f"task_fraction must be in [0, 1), got {self.task_fraction}")
        check(self.eval_texts >= 0, f"eval_texts must be >= 0, got {self.eval_texts}")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: ["zero_shot", "standalone", "fedavg"])
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    sections: dict[str, Any] = field(default_factory=dict, metadata={"toml": False})
    """Method sections (``[fedcollm]``, ...), one per registered method that has a config; read with
    :meth:`section`. Each is the method's own config dataclass (see ``fedkt.registry``)."""

    @property
    def eval_tasks(self) -> list[str]:
        return self.data.eval_tasks or self.data.tasks

    def section(self, method: str) -> Any:
        """The config of ``method``'s own section (its defaults when the TOML has none)."""
        if method not in self.sections:
            from fedkt import registry

            self.sections[method] = registry.default_section(method)
        return self.sections[method]

    def to_dict(self) -> dict[str, Any]:
        from fedkt import registry

        out = {f.name: dataclasses.asdict(getattr(self, f.name)) if dataclasses.is_dataclass(getattr(self, f.name))
               else getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("toml", True)}
        for name in registry.config_sections():
            out[name] = dataclasses.asdict(self.section(name))
        return out


# ----------------------------------------------------------------------------------------------------
# building dataclasses from dicts, with validation


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a {_type_name(tp)}, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    raise TypeError(f"unsupported config type {tp} at {key}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and ill-typed values."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("toml", True)]
    sections: dict[str, type] = {}
    if cls is ExperimentConfig:
        from fedkt import registry

        sections = registry.config_sections()
    unknown = [k for k in data if k not in names and k not in sections]
    if unknown:
        where = f"[{prefix[:-1]}]" if prefix else "the top level"
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} in {where}; allowed keys: {', '.join(names + list(sections))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items() if k in names}
    if sections:
        kwargs["sections"] = {}
        for name, section_cls in sections.items():
            value = data.get(name, {})
            if not isinstance(value, dict):
                raise ConfigError(f"[{name}] must be a table, got {value!r}")
            kwargs["sections"][name] = from_dict(section_cls, value, prefix=name + ".")
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{prefix}{e}") from None


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Cross-section checks that no single section can make (each section validates itself)."""
    from fedkt import registry

    known = registry.methods()
    for i, m in enumerate(cfg.methods):
        if m not in known:
            raise ConfigError(f"methods[{i}] = {m!r} is not a method; allowed values: {', '.join(known)}")
    if not cfg.data.tasks and cfg.partition.scheme != "files":
        raise ConfigError("data.tasks must name at least one task")
    if cfg.partition.scheme == "files" and len(cfg.partition.files) != cfg.partition.num_clients:
        raise ConfigError(
            f"partition.files lists {len(cfg.partition.files)} files but partition.num_clients = "
            f"{cfg.partition.num_clients}; give one file per client"
        )
    f = cfg.federation
    if f.secure_aggregation and cfg.partition.num_clients < f.secagg_min_clients:
        raise ConfigError(
            f"federation.secure_aggregation with partition.num_clients = {cfg.partition.num_clients}: secure "
            f"aggregation needs at least federation.secagg_min_clients = {f.secagg_min_clients} clients (with 2, "
            "each client learns the other's update from the mean); add clients or turn secure_aggregation off")
    for m in cfg.methods:
        if known[m].needs_llm and not cfg.model.llm:
            raise ConfigError(f"method {m!r} needs a server LLM: set model.llm")
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4); values parse as TOML, else as a bare string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a table")
        node[path[-1]] = value
    return data


def read_toml(path: str | Path | None) -> dict[str, Any]:
    """A TOML file as a dict ({} for no file), with errors that name the file."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


def _is_local_path(value: str) -> bool:
    """A relative file/dir/model value (not empty, not absolute, not a ``scheme:`` spec such as
    ``builtin:NAME``, ``hf:ORG/NAME`` or ``openai:URL``)."""
    return bool(value) and not Path(value).is_absolute() and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value)


def resolve_paths(cls: type, data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Rewrite, in place, every relative value of a path field (metadata ``PATH``) of ``cls`` (and its
    nested sections, and the registered method sections of an experiment) as ``base / value``."""
    if not isinstance(data, dict):
        return data
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    nested: dict[str, type] = {n: hints[n] for n in fields if dataclasses.is_dataclass(hints[n])}
    if cls is ExperimentConfig:
        from fedkt import registry

        nested.update(registry.config_sections())
    for key, value in data.items():
        f = fields.get(key)
        if key in nested:
            resolve_paths(nested[key], value, base)
        elif f is not None and f.metadata.get("path"):
            if isinstance(value, str) and _is_local_path(value):
                data[key] = str((base / value).resolve())
            elif isinstance(value, list):
                data[key] = [str((base / v).resolve()) if isinstance(v, str) and _is_local_path(v) else v
                             for v in value]
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The experiment in TOML file ``path`` (its relative paths resolved against the file's directory),
    with ``--set`` ``overrides`` (relative to the working directory) on top."""
    data = read_toml(path)
    if path is not None:
        resolve_paths(ExperimentConfig, data, Path(path).resolve().parent)
    apply_overrides(data, overrides or [])
    return validate(from_dict(ExperimentConfig, data))


def load_section(cls: type, path: str | Path | None, section: str, overrides: list[str] | None = None,
                 values: dict[str, Any] | None = None) -> Any:
    """One table of a TOML file (e.g. ``[derive]``) as ``cls``, with ``--set key=value`` overrides
    (keys relative to the table) and explicit ``values`` (e.g. from command-line flags) on top."""
    raw = read_toml(path)
    if path is not None and section not in raw:
        stray = sorted(k for k in raw if not isinstance(raw[k], dict))
        raise ConfigError(f"{path}: no [{section}] table" + (
            f" (found top-level keys {', '.join(stray)}: put them under a [{section}] line)" if stray else ""))
    data = raw.get(section, {})
    if path is not None:
        resolve_paths(cls, data, Path(path).resolve().parent)
    apply_overrides(data, overrides or [])
    data.update({k: v for k, v in (values or {}).items() if v is not None})
    return from_dict(cls, data, prefix=section + ".")


def dump_toml(cfg: Any) -> str:
    import tomli_w

    return tomli_w.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg))
