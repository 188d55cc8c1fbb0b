"""``fedkt plan CONFIG``: what an experiment will cost, before it runs, without loading any weights.

For each role (server LLM, server SLM copy, each client's SLM) and each method of the config: parameters,
trainable (LoRA) parameters, adapter bytes, bytes per round per direction, a peak-memory estimate
(weights + trainable states + activations) and the optimizer steps per round and in total.

Parameters are exact: the model is built from its ``config.json`` on PyTorch's ``meta`` device (no
memory, no download) and wrapped by peft with the configured LoRA, as ``fedkt run`` does. The config comes
from a local model directory, the fedkt cache (``builtin:``) or the table of known public architectures
(:mod:`fedkt.plan_archs`). Memory and text traffic are estimates; the formulas are in :mod:`fedkt.plan_memory`
and docs/gpu.md, and ``benchmarks/plan_vs_measured.py`` checks them against a measured run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedkt.config import ConfigError, ExperimentConfig
from fedkt.plan_memory import Arch, Options, activation_bytes, dtype_bytes, kv_cache_bytes, weight_bytes
from fedkt.plan_methods import (BYTES_PER_TOKEN_TEXT, PLANNED, SECAGG_BYTES_PER_VALUE, Row, method_rows,
                                sft_steps, states)


# ---------------------------------------------------------------------------------------------- models
@dataclass
class ModelFacts:
    """What the planner knows about one role's model (all counts exact, from a meta-device build)."""

    role: str
    spec: str
    source: str
    arch: Arch | None = None
    params: int = 0
    trainable: int = 0
    quantizable: int = 0
    """Parameters in the decoder's linear layers (what ``load_in_4bit`` stores in 4 bits)."""
    served: bool = False
    """An ``openai:`` server: no local memory, text only."""

    @property
    def adapter_bytes(self) -> int:
        return 4 * self.trainable  # peft keeps adapters in fp32 (autocast_adapter_dtype) and fedkt sends them so

    def to_dict(self, opts: Options) -> dict[str, Any]:
        if self.served:
            return {"role": self.role, "spec": self.spec, "served": True}
        return {"role": self.role, "spec": self.spec, "source": self.source, "model_type": self.arch.model_type,
                "layers": self.arch.layers, "hidden": self.arch.hidden, "vocab": self.arch.vocab,
                "params": self.params, "trainable": self.trainable, "adapter_bytes": self.adapter_bytes,
                "dtype": opts.dtype_of(self.role), "load_in_4bit": opts.four_bit(self.role),
                "weights_bytes": weight_bytes(self, opts)}


def config_dict(spec: str) -> tuple[dict | None, str]:
    """``(config.json as a dict, where it came from)``; ``(None, "served")`` for an ``openai:`` model."""
    # deferred: the planner reads config.json only; torch, the data and tokenizer stack load when a plan needs them
    from fedkt.plan_archs import known

    if spec.startswith("openai:"):
        return None, "served"
    if spec.startswith("builtin:"):
        # deferred: the planner reads config.json only; torch, the data and tokenizer stack load when a plan needs them
        from fedkt.builtin_models import cache_dir

        f = cache_dir() / spec.split(":", 1)[1] / "config.json"
        if f.is_file():
            return json.loads(f.read_text()), str(f)
        cfg = known(spec)
        if cfg is None:
            raise ConfigError(f"model {spec!r}: not a built-in model (fedkt models lists them)")
        return cfg, cfg.pop("source")
    name = spec[3:] if spec.startswith("hf:") else spec
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text()), str(p / "config.json")
    cfg = known(name)
    if cfg is not None:
        return cfg, cfg.pop("source")
    # deferred: the planner reads config.json only; torch, the data and tokenizer stack load when a plan needs them
    from fedkt.plan_archs import KNOWN

    raise ConfigError(
        f"model {spec!r}: fedkt plan needs its config.json and downloads nothing; give a local model directory "
        f"(with config.json), a built-in, or one of the known architectures: {', '.join(k for k in KNOWN if '/' in k)}")


_CACHE: dict[str, tuple] = {}


def count(config: dict, lora) -> tuple[int, int, int, Any]:
    """(parameters, LoRA trainable parameters, quantizable linear parameters, HF config) of a model built on
    the meta device from ``config`` and wrapped with ``lora`` (a ``LoraSettings``) by peft."""
    key = json.dumps([config, lora.r, sorted(lora.target_modules)], sort_keys=True, default=str)
    if key in _CACHE:
        return _CACHE[key]
    # deferred: the planner reads config.json only; torch, the data and tokenizer stack load when a plan needs them
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    kw = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "source")}
    hf = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    params = sum(p.numel() for p in model.parameters())
    out_emb = model.get_output_embeddings()
    skip = {id(out_emb)} if out_emb is not None else set()
    quant = sum(m.weight.numel() for m in model.modules()
                if type(m).__name__ in ("Linear", "Conv1D") and id(m) not in skip)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                          target_modules=list(lora.target_modules),
                                                          task_type="CAUSAL_LM"))
    except ValueError as e:
        raise ConfigError(f"lora.target_modules = {list(lora.target_modules)} do not fit a {hf.model_type} model: "
                          f"{e}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    _CACHE[key] = (params, trainable, quant, hf)
    return _CACHE[key]


def model_facts(role: str, spec: str, lora) -> ModelFacts:
    cfg, source = config_dict(spec)
    if cfg is None:
        return ModelFacts(role, spec, source, served=True)
    params, trainable, quant, hf = count(cfg, lora)
    return ModelFacts(role, spec, source, Arch.from_hf(hf), params, trainable, quant)


# ---------------------------------------------------------------------------------------------- data and steps
def client_data(cfg: ExperimentConfig) -> tuple[list[list], list, str]:
    """(each client's examples, the auxiliary examples, "loaded"), the partition ``fedkt run`` makes, when the
    data is readable here; else ``([[None] * n_k ...], [None] * aux, "estimated")`` from
    ``data.max_train_examples``."""
    try:
        # deferred: the planner reads config.json only; torch, the data and tokenizer stack load when a plan needs them
        from fedkt.simulation import load_client_data

        clients, aux = load_client_data(cfg)
        return clients, aux, "loaded"
    except (OSError, ValueError) as e:
        d, p = cfg.data, cfg.partition
        if d.max_train_examples <= 0:
            raise ConfigError(f"fedkt plan: cannot read the data ({e}); set data.max_train_examples so the "
                              f"planner can estimate the clients' shares") from None
        rest = max(0, d.max_train_examples * len(d.tasks) - p.aux_size)
        sizes = [rest // p.num_clients + (i < rest % p.num_clients) for i in range(p.num_clients)]
        return [[None] * n for n in sizes], [None] * p.aux_size, "estimated"


def local_tokenizer_dir(spec: str) -> Path | None:
    """The directory holding ``spec``'s tokenizer, if it is on this machine already (nothing is built)."""
    if spec.startswith("builtin:"):
        # deferred: the planner reads config.json only; torch, the data and tokenizer stack load when a plan needs them
        from fedkt.builtin_models import cache_dir

        d = cache_dir() / spec.split(":", 1)[1]
    else:
        d = Path(spec).expanduser()
    return d if (d / "tokenizer_config.json").is_file() else None


def data_seq_len(cfg: ExperimentConfig, examples: list) -> tuple[int, str]:
    """(tokens of the longest training sequence, capped at ``train.max_length``; where the number comes from).
    A batch is padded to its longest row, so the batch holding the longest example is the peak. Needs the
    data and the SLM's tokenizer on this machine; otherwise ``train.max_length``."""
    longest, _, source = data_lengths(cfg, examples)
    return longest, source


def data_lengths(cfg: ExperimentConfig, examples: list) -> tuple[int, int, str]:
    """``data_seq_len``'s (longest sequence, source) with the most supervised (answer) tokens of one example
    between them (0 where the data or tokenizer is not here): answer-only SFT runs the LM head on those."""
    d = local_tokenizer_dir(cfg.model.slm)
    if d is None or not examples or examples[0] is None:
        return cfg.train.max_length, 0, "train.max_length"
    # deferred: the planner reads config.json only; torch, the data and tokenizer stack load when a plan needs them
    from transformers import AutoTokenizer

    from fedkt.data.collate import IGNORE
    from fedkt.train import tokenize_examples

    tok = AutoTokenizer.from_pretrained(d)
    sft = tokenize_examples(tok, examples, cfg.train.max_length)
    answers = max(sum(1 for x in e.labels[1:] if x != IGNORE) for e in sft)  # positions answer_loss reads
    return max(len(e.input_ids) for e in sft), answers, "longest tokenized training example"


# ---------------------------------------------------------------------------------------------- the plan
def plan(cfg: ExperimentConfig, opts: Options | None = None, config_path: str = "") -> dict[str, Any]:
    """The plan of ``cfg`` as a JSON-able dict (see :func:`render`)."""
    opts = opts or Options.from_config(cfg)
    models = {"slm": model_facts("slm", cfg.model.slm, cfg.lora)}
    if cfg.model.llm:
        models["llm"] = model_facts("llm", cfg.model.llm, cfg.lora)
    clients, aux_examples, data_source = client_data(cfg)
    sizes, aux = [len(c) for c in clients], len(aux_examples)
    if opts.seq_len <= 0:
        opts.seq_len, answers, opts.seq_len_source = data_lengths(cfg, [e for c in clients for e in c])
        opts.aux_seq_len, aux_answers = (data_lengths(cfg, aux_examples)[:2] if aux_examples
                                         else (opts.seq_len, 0))
        opts.answer_len = opts.answer_len or (max(answers, aux_answers) if answers else 0)
    methods, transient, notes = {}, {"server": 0, "client": 0}, []
    for name in cfg.methods:
        rows, busy = method_rows(name, cfg, models, sizes, aux, opts)
        if name not in PLANNED:
            notes.append(f"{name}: not in fedkt.plan_methods; " + ("planned as FedAvg (clients train, adapters "
                         "both ways)" if rows else "not planned (one-shot method)"))
        methods[name] = [r.to_dict() for r in rows]
        transient = {w: max(transient[w], busy[w]) for w in transient}
    server_roles = {r["role"].split()[1].lower() for rows in methods.values() for r in rows
                    if r["where"] == "server" and r["peak_parts"]}
    resident = sum(weight_bytes(models[r], opts) for r in server_roles if r in models)
    client_w = weight_bytes(models["slm"], opts)
    sim = resident + client_w + max(transient.values())
    return {"config": config_path, "name": cfg.name, "options": opts.to_dict(),
            "data": {"source": data_source, "clients": sizes, "aux": aux},
            "models": {k: v.to_dict(opts) for k, v in models.items()},
            "methods": methods,
            "processes": {"server_peak_bytes": resident + transient["server"],
                          "client_peak_bytes": client_w + transient["client"],
                          "simulation_peak_bytes": sim},
            "notes": notes + NOTES}


NOTES = ["peak = weights + adapter/gradients/AdamW + activations of the busiest phase; add the runtime "
         "(Python + torch: ~0.4-0.6 GB RSS on CPU, ~0.5 GB CUDA context on a GPU)",
         "simulation = one `fedkt run` process: the server's models + one shared client SLM base + the largest phase"]


# ---------------------------------------------------------------------------------------------- rendering
def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def count_str(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def render(p: dict[str, Any]) -> str:
    o = p["options"]
    lines = [f"# fedkt plan: {p['name']}" + (f" ({p['config']})" if p["config"] else ""), "",
             f"dtype {o['dtype']}, 4-bit {', '.join(o['load_in_4bit']) or 'off'}, gradient checkpointing "
             f"{'on' if o['gradient_checkpointing'] else 'off'}, sequence length {o['seq_len']} "
             f"(aux {o['aux_seq_len']}{'; answer ' + str(o['answer_len']) if o.get('answer_len') else ''}; "
             f"{o['seq_len_source']}); "
             f"clients {p['data']['clients']} examples ({p['data']['source']}), aux {p['data']['aux']}", "",
             "| role | model | params | trainable (LoRA) | adapter | weights |", "|---|---|---|---|---|---|"]
    for m in p["models"].values():
        if m.get("served"):
            lines.append(f"| {m['role']} | {m['spec']} (served) | – | – | – | – |")
            continue
        lines.append(f"| {m['role']} | {m['spec']} ({m['model_type']}, {m['layers']} layers) | "
                     f"{count_str(m['params'])} | "
                     f"{count_str(m['trainable'])} | {human(m['adapter_bytes'])} | {human(m['weights_bytes'])} |")
    lines += ["", "| method | role | steps/round | steps total | down/round | up/round | peak memory "
              "(weights + states + activations) |", "|---|---|---|---|---|---|---|"]
    for name, rows in p["methods"].items():
        for r in rows:
            pp = r["peak_parts"]
            if not pp:
                lines.append(f"| {name} | {r['role']} | – | – | – | – | (served elsewhere) |")
                continue
            approx = "≈" if r["bytes_estimated"] else ""
            parts = " + ".join(human(pp.get(k, 0)) for k in ("weights", "states", "activations"))
            lines.append(f"| {name} | {r['role']} | {r['steps_per_round']} | {r['steps_total']} | "
                         f"{approx}{human(r['down_bytes_per_round'])} | {approx}{human(r['up_bytes_per_round'])} | "
                         f"{human(r['peak_bytes'])} ({parts}) |")
    pr = p["processes"]
    lines += ["", f"Peak memory per process: server {human(pr['server_peak_bytes'])}, each client "
              f"{human(pr['client_peak_bytes'])}, in-process simulation {human(pr['simulation_peak_bytes'])}.", ""]
    lines += [f"- {n}" for n in p["notes"]]
    return "\n".join(lines)


__all__ = ["plan", "render", "Options", "model_facts", "sft_steps", "client_data", "dtype_bytes", "kv_cache_bytes",
           "activation_bytes", "states", "Row", "SECAGG_BYTES_PER_VALUE", "BYTES_PER_TOKEN_TEXT"]
