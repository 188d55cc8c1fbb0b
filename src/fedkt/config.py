"""The experiment's schema: typed sections (``[model]``, ``[data]``, ``[train]``, ...) and the checks across them.

An experiment config is a tree of dataclasses whose field docstrings are the reference
(docs/configuration.md is generated from them: ``python -m fedkt.docs_config``). Each method adds its own
section type (``[fedcollm]``, ...): the caller feeds the methods to :func:`load_experiment` (the registry
does, in ``fedkt.registry.load_config``), so this module knows no method. Reading TOML, ``--set``
overrides, path resolution and per-key errors are the generic engine in ``fedkt.toml_config``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from fedkt.toml_config import (  # noqa: F401 - the engine's names that sections and callers use
    PATH,
    ConfigError,
    FieldError,
    apply_overrides,
    check,
    check_positive,
    dump_toml,
    from_dict,
    load_section,
    read_toml,
    resolve_paths,
)

T = TypeVar("T")
TASKS = ("arc_easy", "arc_challenge", "openbookqa", "commonsense_qa", "gsm8k")
GENERATION_TASKS = ("gsm8k",)
"""Tasks scored by generation (no choices): a prompt format does not apply to them."""
PromptFormat = Literal["harness", "cloze"]
"""How a multiple-choice task is prompted and scored (``eval.format``; :mod:`fedkt.data.prompts`)."""
PROMPT_FORMATS: tuple[str, ...] = typing.get_args(PromptFormat)
EvalPrecision = Literal["model", "bf16-checked"]
EVAL_PRECISIONS: tuple[str, ...] = typing.get_args(EvalPrecision)


@dataclass
class ModelConfig:
    slm: str = field(default="builtin:smollm2-135m", metadata=PATH)
    """The clients' small model: ``builtin:NAME``, a local HF directory, a ``.gguf`` file or ``hf:ORG/NAME``."""
    llm: str = field(default="", metadata=PATH)
    """The server's large model; same forms as ``slm``. Needed by the methods that say so (``fedkt methods``);
    adds LLM rows to ``zero_shot`` and ``centralized``."""
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""
    # -- devices and precision (docs/devices.md); ``placement(role)`` resolves the per-role overrides --
    device: str = "auto"
    """Where the models compute: "auto" (cuda if available, else mps, else cpu), "cpu", "cuda", "cuda:N", "mps"
    (docs/devices.md)."""
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
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """LoRA dropout, in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names LoRA wraps."""

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
    """Split of ``tasks`` the clients' data comes from."""
    eval_split: str = "test"
    """Split evaluated on."""
    max_train_examples: int = 0
    """Cap on training examples per task before partitioning (0 = all); a seeded subsample."""
    on_bad_line: Literal["error", "skip"] = "error"
    """"error": a bad row stops with ``file:line: reason``; "skip": it is skipped and the count warned."""

    def __post_init__(self):
        for key, tasks in (("tasks", self.tasks), ("eval_tasks", self.eval_tasks)):
            for i, t in enumerate(tasks):
                check(t in TASKS, f"{key}[{i}] = {t!r} is not a task; allowed values: {', '.join(TASKS)}")


@dataclass
class PartitionConfig:
    num_clients: int = 4
    """K, the number of clients."""
    scheme: Literal["iid", "dirichlet", "files"] = "iid"
    """How the training data is split: "iid", "dirichlet" (over ``key``, concentration ``alpha``) or "files"
    (one JSONL per client)."""
    alpha: float = 0.5
    """Dirichlet concentration (scheme = "dirichlet"); smaller is more skewed."""
    key: str = "answer"
    """Example field the Dirichlet split is taken over: "answer" (the gold choice index) or "task"."""
    files: list[str] = field(default_factory=list, metadata=PATH)
    """One JSONL file per client (scheme = "files")."""
    aux_size: int = 200
    """Examples held out of the training data as the server's auxiliary (public) set, disjoint from the clients'
    data."""

    def __post_init__(self):
        check_positive(self, "num_clients", "alpha")
        check(self.aux_size >= 0, f"aux_size must be >= 0, got {self.aux_size}")


@dataclass
class TrainConfig:
    lr: float = 3e-4
    """AdamW learning rate."""
    epochs: float = 1.0
    """Local epochs per round (standalone/centralized train ``epochs * rounds`` in total)."""
    max_steps: int = 0
    """If > 0, caps optimizer steps per training call (overrides epochs)."""
    batch_size: int = 8
    """Examples per forward pass."""
    grad_accum: int = 1
    """Forward passes per optimizer step."""
    max_length: int = 256
    """Tokens per example; long prompts are cut from the left, answers kept."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.05
    """Fraction of the steps the learning rate warms up over."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""

    def __post_init__(self):
        check_positive(self, "batch_size", "grad_accum", "max_length", "lr")
        check(self.epochs > 0 or self.max_steps > 0, "epochs must be > 0 (or set train.max_steps)")


@dataclass
class EvalConfig:
    limit: int = 0
    """Seeded subsample of each eval split (0 = all)."""
    batch_size: int = 32
    """Sequences per forward pass: a multiple-choice question counts one per choice (packed, as many questions
    as fit in the padded tokens of this many single (question, choice) rows; lettered: one per question);
    generation (GSM8K) runs half as many prompts at once."""
    every_round: bool = True
    """Evaluate after every round (else only after the last)."""
    max_new_tokens: int = 256
    """GSM8K greedy generation budget."""
    per_question: bool = True
    """Record which questions each evaluation got right (results.json ``questions`` and ``correct``; the
    report's paired differences). Clients that evaluate their own SLM (standalone, FDKT, FedCoT's paper mode)
    then send one 0/1 character per question and metric besides their metrics, where their own policy allows
    it (a deployed client's ``policy.allow_per_question``, default false; a simulated client's follows this
    key); false: metrics only."""
    format: PromptFormat | dict[str, PromptFormat] = "harness"
    """Prompt format of the multiple-choice tasks, for training and evaluation alike (SFT targets, the
    distillation and synthetic sets, FedCoT's label task): "harness" = lm-evaluation-harness's prompts
    (CommonsenseQA lettered ``A. .. E.``, answered with the letter); "cloze" = each choice's text scored as
    the continuation of the question (CommonsenseQA as ARC: ``Question: ...\\nAnswer:`` + `` {choice}``),
    which small models learn from few examples. ARC and OpenBookQA read the same in both. One value for
    every task, or a table per task (``{commonsense_qa = "cloze"}``; tasks it does not name: "harness").
    GSM8K (generation) has no choices: a single value leaves it alone, a table must not name it
    "cloze". See docs/evaluation.md."""
    precision: EvalPrecision = "model"
    """Arithmetic of multiple-choice scoring. "model": the model's own dtype (fp32 on a CPU: the harness's
    numbers to ~1e-5). "bf16-checked": a copy of an fp32 model whose matmuls run in bf16 (residual stream,
    norms and LM head in fp32) scores the questions; a sample of 32 is scored in fp32 too to measure how far
    bf16 moves a choice margin, and every question whose bf16 margin is below 4x the largest shift seen is
    re-scored in fp32: the same predictions, accuracies and per-question correctness (recorded
    log-likelihoods of the others are bf16's). Lettered questions (CommonsenseQA) score ~1.9x faster where
    bf16 is cheap (a GPU, or a CPU with AMX/AVX512-BF16; elsewhere it scores in fp32 with a warning); where
    over a quarter of the sample is too close to call (small models on choice texts) the rest is scored in
    fp32. See docs/evaluation.md."""

    def __post_init__(self):
        check_positive(self, "batch_size", "max_new_tokens")
        check(self.precision in EVAL_PRECISIONS, f"precision = {self.precision!r} is not allowed; allowed values: "
              f"{', '.join(map(repr, EVAL_PRECISIONS))}")
        allowed = ", ".join(map(repr, PROMPT_FORMATS))
        if not isinstance(self.format, dict):
            check(self.format in PROMPT_FORMATS, f"format = {self.format!r} is not allowed; allowed values: {allowed}")
        else:
            for t, f in self.format.items():
                check(t in TASKS, f"format.{t}: {t!r} is not a task; allowed keys: {', '.join(TASKS)}")
                check(f in PROMPT_FORMATS, f"format.{t} = {f!r} is not allowed; allowed values: {allowed}")
                check(f == "harness" or t not in GENERATION_TASKS,
                      f"format.{t} = {f!r}: {t} is a generation task with no choices to score in a cloze; "
                      f"remove it from the table (generation prompts have one format)")

    def format_of(self, task: str) -> PromptFormat:
        """The prompt format of ``task`` ("harness" for generation tasks)."""
        if task in GENERATION_TASKS:
            return "harness"
        return self.format.get(task, "harness") if isinstance(self.format, dict) else self.format


@dataclass
class MetricsConfig:
    """Where per-round metrics go besides ``RUN/metrics.jsonl`` (the source, always written): each row is
    mirrored to TensorBoard and/or MLflow as it is written, so a run can be watched live (docs/results.md)."""

    tensorboard: bool = False
    """Mirror metrics.jsonl to TensorBoard event files in ``RUN/tensorboard/METHOD/`` (one TensorBoard run per
    method, tags ``ROLE/TASK/METRIC``; ``tensorboard --logdir RUN/tensorboard``). Needs the ``tensorboard``
    package: ``pip install 'fedkt[tensorboard]'``."""
    mlflow: bool = False
    """Mirror metrics.jsonl to MLflow: one MLflow run per method (step = round), the resolved config as its
    params, in a local file store (no server). Needs ``pip install 'fedkt[mlflow]'`` (mlflow-skinny)."""
    mlflow_dir: str = field(default="", metadata=PATH)
    """The MLflow file store (a directory, created if missing; share one across runs to compare them in one
    ``mlflow ui``); empty: ``RUN/mlruns``."""
    mlflow_experiment: str = ""
    """The MLflow experiment the runs go to; empty: the experiment's ``name``."""

    def __post_init__(self):
        for key, module, extra in (("tensorboard", "tensorboard", "tensorboard"), ("mlflow", "mlflow", "mlflow")):
            check(not getattr(self, key) or find_spec(module) is not None,
                  f"{key} = true, but the {module!r} package is not installed: pip install 'fedkt[{extra}]' "
                  f"(or set metrics.{key} = false)")
        check("://" not in self.mlflow_dir or self.mlflow_dir.startswith("file://"),
              f"mlflow_dir = {self.mlflow_dir!r}: a local directory (MLflow's file store), not a server URI")


@dataclass
class FederationConfig:
    rounds: int = 3
    """T, the number of federated rounds."""
    on_client_failure: Literal["stop", "skip"] = "stop"
    """A failing client stops the run ("stop") or is reported and left out of the round ("skip")."""
    min_clients: int = 1
    """Under "skip": fewer replies than this in a call stop the run (the last checkpoint is kept)."""
    secure_aggregation: bool = False
    """Methods whose spec declares ``supports_secure_aggregation`` (FedAvg, FedProx, FedAvgM, FedCoLLM, FedCoT)
    average the clients' adapters by secure aggregation (Flower: SecAgg+; in process: the same mean, computed
    in the clear); a federated method that does not declare it is refused."""
    clients_per_round: int = 0
    """Clients sampled each round by the FedAvg-style methods (0: all). Drawn without replacement from the
    experiment seed and the round number (a resumed run draws the same); the mean weighs the sampled clients'
    replies only; the round's metrics list them (``sampled_clients``). 1 ≤ k ≤ partition.num_clients, and
    ≥ secagg_min_clients under secure aggregation."""
    timeout_s: float = 1800.0
    """Flower runtime: seconds to wait for a call's replies; a client that misses it failed (finite: > 0)."""
    round_deadline_s: float = 7200.0
    """Flower runtime: seconds from a round's first call after which its calls wait for nobody (each call waits
    at most ``min(timeout_s, what is left)``): one hung client costs a round at most this. SecAgg+ stages are
    bounded by ``timeout_s`` each (finite: > 0)."""
    max_payload_mb: float = 2047.0
    """Flower runtime: payloads (either direction) above this many MiB are refused with an error."""
    secagg_min_clients: int = 3
    """Secure aggregation refuses to run over fewer clients (>= 3: with 2, each learns the other's update); also
    checked against ``partition.num_clients``."""
    secagg_reconstruction_threshold: float = 0.5
    """SecAgg+: shares needed to rebuild a secret (a fraction of the clients, or an integer count)."""
    secagg_max_weight: float = 1000.0
    """SecAgg+: the largest client weight (examples) expected; weights are scaled by it before quantisation."""
    secagg_clipping_range: float = 8.0
    """SecAgg+: (weight-scaled) update values are clipped to [-c, c] before quantisation."""
    secagg_quantization_range: int = 2**22
    """SecAgg+: quantisation levels over [-c, c] (grid step 2c/q); the per-round error bound
    (``secagg.<method>.error_bound`` in ``per_round``) is ``n·2c/q / Σ(wᵢ/W)``."""
    secagg_modulus_range: int = 2**32
    """SecAgg+: the masking modulus (a power of two, >= clients x quantization range)."""

    def __post_init__(self):
        check_positive(self, "rounds", "min_clients", "max_payload_mb", "secagg_reconstruction_threshold",
                       "secagg_max_weight", "secagg_clipping_range", "secagg_quantization_range")
        check(self.clients_per_round >= 0, f"clients_per_round must be >= 0 (0: all clients), got {self.clients_per_round}")
        for key in ("timeout_s", "round_deadline_s"):
            v = getattr(self, key)
            check(v > 0 and v != float("inf"), f"federation.{key} must be a finite number of seconds > 0, got {v} "
                  "(0 does not mean 'wait for ever': a hung client would stall the run)")
        check(self.secagg_min_clients >= 3,
              f"secagg_min_clients = {self.secagg_min_clients}: secure aggregation needs at least 3 clients "
              "(with 2, each client learns the other's update from the mean); raise it to 3 or more")
        q, m = self.secagg_quantization_range, self.secagg_modulus_range
        check(q <= 2**30, f"secagg_quantization_range = {q} must be <= 2^30 (SecAgg+ rounds into int32)")
        check(m >= 2 * q and m <= 2**62 and m & (m - 1) == 0,
              f"secagg_modulus_range = {m} must be a power of two in [2 x secagg_quantization_range, 2^62]")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    """Run name (the run directory is ``runs/NAME-TIME`` unless ``--out``)."""
    seed: int = 0
    """Every random choice derives from it."""
    methods: list[str] = field(default_factory=lambda: ["zero_shot", "standalone", "fedavg"])
    """Registered methods to run, in order (``fedkt methods`` lists them)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sections: dict[str, Any] = field(default_factory=dict, metadata={"toml": False})
    """Method sections (``[fedcollm]``, ...), one per method the loader was given that has a config; read
    with :meth:`section`. Each is the method's own config dataclass (see ``fedkt.registry``)."""

    @property
    def eval_tasks(self) -> list[str]:
        return self.data.eval_tasks or self.data.tasks

    def section(self, kind: type[T]) -> T:
        """The method section of type ``kind`` (e.g. ``cfg.section(FedCoLLMConfig)``); its defaults when the
        config has none."""
        if not isinstance(kind, type):
            raise TypeError(f"section() takes the section's config class (e.g. cfg.section(FedCoLLMConfig)), "
                            f"not {kind!r}")
        for value in self.sections.values():
            if type(value) is kind:
                return value
        return kind()

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) if dataclasses.is_dataclass(getattr(self, f.name))
               else getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("toml", True)}
        out.update({name: dataclasses.asdict(value) for name, value in self.sections.items()})
        return out


class MethodSchema(Protocol):
    """What config loading needs of a method (``fedkt.registry.MethodSpec`` is one)."""

    config: type | None
    needs_llm: bool
    algorithm: Any
    """Set for a federated (round-by-round) method; None for a one-shot one."""
    supports_secure_aggregation: bool


def config_sections(methods: Mapping[str, MethodSchema]) -> dict[str, type]:
    """Method name -> config dataclass, for the methods that have a TOML section."""
    return {n: m.config for n, m in methods.items() if m.config is not None}


def validate(cfg: ExperimentConfig, methods: Mapping[str, MethodSchema]) -> ExperimentConfig:
    """Cross-section checks that no single section can make (each section validates itself); ``methods``
    are the known methods by name."""
    for i, m in enumerate(cfg.methods):
        if m not in methods:
            raise ConfigError(f"methods[{i}] = {m!r} is not a method; allowed values: {', '.join(methods)}")
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
    k = f.clients_per_round
    if k and not 1 <= k <= cfg.partition.num_clients:
        raise ConfigError(f"federation.clients_per_round = {k}: it must be between 1 and partition.num_clients = "
                          f"{cfg.partition.num_clients} (or 0 for every client each round)")
    if f.secure_aggregation and k and k < f.secagg_min_clients:
        raise ConfigError(
            f"federation.clients_per_round = {k} with secure_aggregation: each round's secure mean needs at least "
            f"federation.secagg_min_clients = {f.secagg_min_clients} clients; sample more clients per round")
    for m in cfg.methods:
        spec = methods[m]
        if f.secure_aggregation and spec.algorithm is not None and not spec.supports_secure_aggregation:
            raise ConfigError(
                f"federation.secure_aggregation = true, but method {m!r} does not support secure aggregation (its "
                f"MethodSpec does not declare supports_secure_aggregation): its server would see each client's "
                f"upload. Remove {m!r} from methods or set federation.secure_aggregation = false")
    for m in cfg.methods:
        if methods[m].needs_llm and not cfg.model.llm:
            raise ConfigError(f"method {m!r} needs a server LLM: set model.llm")
    return cfg


def experiment_from_dict(data: dict[str, Any], methods: Mapping[str, MethodSchema]) -> ExperimentConfig:
    """The experiment in ``data`` (a parsed TOML document), with a section for each of ``methods``."""
    return validate(from_dict(ExperimentConfig, data, sections=config_sections(methods)), methods)


def load_experiment(path: str | Path | None, overrides: list[str] | None,
                    methods: Mapping[str, MethodSchema]) -> ExperimentConfig:
    """The experiment in TOML file ``path`` (its relative paths resolved against the file's directory),
    with ``--set`` ``overrides`` (relative to the working directory) on top. ``methods`` (name -> spec) are
    the methods it may name and whose sections it may hold: ``fedkt.registry.load_config`` passes the
    registered ones."""
    data = read_toml(path)
    if path is not None:
        resolve_paths(ExperimentConfig, data, Path(path).resolve().parent, sections=config_sections(methods))
    apply_overrides(data, overrides or [])
    return experiment_from_dict(data, methods)
