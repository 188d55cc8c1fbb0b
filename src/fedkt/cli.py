"""The ``fedkt`` command line: run experiments, evaluate models, derive SLMs, render reports."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from fedkt import progress

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fedkt: federated knowledge transfer between a server LLM and clients' SLMs.")


def _methods_help() -> str:
    # deferred: a command imports what it runs; `fedkt --help` loads no torch
    from fedkt import registry

    return "\n\n".join(f"{name}: {spec.summary}" for name, spec in registry.methods().items())


@app.command(help="Run the methods an experiment lists; write results.json and report.md.\n\nMethods:\n\n"
             + _methods_help())
def run(config: Path = typer.Argument(..., help="Experiment TOML (see examples/)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: runs/NAME-TIME)."),
        set_: List[str] = typer.Option([], "--set", help="Override a config key, e.g. --set train.lr=1e-4."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoints."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars.")):
    # deferred: a command imports what it runs; `fedkt --help` loads no torch
    from fedkt.experiment import new_run_dir, run_experiment
    from fedkt.registry import load_config
    from fedkt.report import render

    cfg = load_config(config, set_)
    if resume and out is None:
        raise typer.BadParameter("--resume needs --out DIR (the run to continue)")
    out_dir = new_run_dir(cfg, out)
    if not quiet:
        progress.enable()
    try:
        results = run_experiment(cfg, out_dir, resume=resume)
    finally:
        progress.disable()
    typer.echo(render(results))
    typer.echo(f"\nrun directory: {out_dir}  (report.md, results.json, metrics.jsonl, adapters/)")


@app.command("plan")
def plan_(config: Path = typer.Argument(..., help="Experiment TOML."),
          set_: List[str] = typer.Option([], "--set", help="Override a config key, e.g. --set train.batch_size=4."),
          dtype: Optional[str] = typer.Option(None, help="Plan every role in this dtype: fp32, bf16, fp16."),
          load_in_4bit: Optional[bool] = typer.Option(None, "--load-in-4bit", help="The server LLM in 4 bits (QLoRA)."),
          gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing"),
          seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence (default: train.max_length)."),
          json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON.")):
    """Before running: parameters, LoRA size, bytes per round, peak memory and optimizer steps per role
    and method, from the models' config.json only (no weights loaded, nothing downloaded)."""
    # deferred: a command imports what it runs; `fedkt --help` loads no torch
    from fedkt.registry import load_config
    from fedkt.plan import Options, plan, render

    cfg = load_config(config, set_)
    opts = Options.from_config(cfg, dtype, load_in_4bit, gradient_checkpointing, seq_len)
    p = plan(cfg, opts, str(config))
    typer.echo(json.dumps(p, indent=1) if json_out else render(p))


@app.command("eval")
def eval_(model: str = typer.Option("builtin:smollm2-135m", help="Model spec (builtin:NAME, dir, .gguf, hf:ID)."),
          adapter: Optional[Path] = typer.Option(None, help="peft adapter directory to apply."),
          tasks: str = typer.Option("arc_easy", help="Comma-separated tasks."),
          split: str = typer.Option("test"),
          data_dir: str = typer.Option("", help="Directory of TASK/SPLIT.jsonl (default: bundled data); with "
                                       "--harness: the data_dir of local task YAMLs (examples/harness)."),
          limit: int = typer.Option(0, help="Seeded subsample size per task (0 = all); with --harness: "
                                    "lm-eval's limit, the first N documents of each task."),
          batch_size: int = typer.Option(32),
          seed: int = typer.Option(0),
          harness: Optional[str] = typer.Option(None, "--harness", help="Score with lm-evaluation-harness "
                                                "instead: comma-separated lm-eval tasks, groups or tags (e.g. "
                                                "mmlu,arc_easy); needs pip install 'fedkt[harness]'."),
          include_path: List[Path] = typer.Option([], "--include-path", help="With --harness: a folder of "
                                                  "task YAMLs of your own (repeatable; examples/harness)."),
          num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="With --harness: few-shot "
                                                    "examples (default: each task's own, else 0)."),
          prompt_format: str = typer.Option("harness", "--format",
                                            help="Multiple-choice prompt format: harness or cloze (as eval.format)."),
          device: str = typer.Option("cpu", help="auto, cpu, cuda, cuda:N or mps (as model.device)."),
          dtype: str = typer.Option("fp32", help="auto, fp32, bf16 or fp16 (as model.dtype; fp16 needs a GPU)."),
          precision: str = typer.Option("model", help="Multiple-choice arithmetic: model (the model's dtype) or "
                                        "bf16-checked (bf16 scores, close calls re-scored: same predictions; "
                                        "as eval.precision)."),
          json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the scores here.")):
    """Score a model (optionally with a LoRA adapter) on tasks: fedkt's own scorer, or lm-evaluation-harness
    itself with --harness (docs/evaluation.md)."""
    if harness is not None:
        if precision != "model":
            raise typer.BadParameter("--precision is fedkt's own scorer's; lm-evaluation-harness (--harness) "
                                     "scores in the model's dtype")
        _eval_harness(model, adapter, harness, data_dir, limit, batch_size, seed, include_path, num_fewshot,
                      json_out, device, dtype)
        return
    if include_path or num_fewshot is not None:
        raise typer.BadParameter("--include-path and --num-fewshot go with --harness TASKS")
    # deferred: a command imports what it runs; `fedkt --help` loads no torch
    from fedkt.evaluate import evaluate_model

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    progress.enable()
    try:
        scores = evaluate_model(model, names, adapter=adapter, split=split, data_dir=data_dir, limit=limit,
                                batch_size=batch_size, seed=seed, prompt_format=prompt_format, device=device,
                                dtype=dtype, precision=precision)
    finally:
        progress.disable()
    for t, s in scores.items():
        typer.echo(f"{t}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
    if json_out:
        json_out.write_text(json.dumps(scores, indent=2))


def _eval_harness(model, adapter, harness, data_dir, limit, batch_size, seed, include_path, num_fewshot, json_out,
                  device="cpu", dtype="fp32"):
    """``fedkt eval --harness``: lm-eval's tables, then the scores as fedkt's scorer prints them."""
    # deferred: a command imports what it runs (lm-eval is an optional extra)
    from fedkt.harness_eval import evaluate_with_harness, scores as harness_scores, table

    names = [t.strip() for t in harness.split(",") if t.strip()]
    if not names:
        raise typer.BadParameter("--harness needs at least one lm-eval task name")
    res = evaluate_with_harness(model, names, adapter=adapter, limit=limit, batch_size=batch_size,
                                num_fewshot=num_fewshot, include_paths=include_path, data_dir=data_dir, seed=seed,
                                device=device, dtype=dtype)
    typer.echo(table(res))
    scores = harness_scores(res)
    for t, s in scores.items():
        typer.echo(f"{t}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
    if json_out:
        json_out.write_text(json.dumps(scores, indent=2))


def _audit_inputs(model: str, task: str, split: str, data_dir: str, limit: int, neighbors: int, seed: int):
    """What both audit commands attack: the server LLM, its text-DP kit and a seeded subsample of prompts."""
    # deferred: a command imports what it runs; `fedkt --help` loads no torch
    from fedkt.data.partition import subsample
    from fedkt.data.tasks import load_task
    from fedkt.models import load_model
    from fedkt.privacy.text_dp import EmbeddingKit
    from fedkt.seeds import derive_seed

    m, tok = load_model(model)
    m.eval()
    kit = EmbeddingKit.for_model(tok, m.get_input_embeddings().weight.detach(), n_neighbors=neighbors)
    return m, tok, kit, subsample(load_task(task, split, data_dir), limit, derive_seed(seed, "audit", task))


@app.command("audit-text-dp")
def audit_text_dp(model: str = typer.Option("builtin:smollm2-135m", help="The server LLM whose public tokenizer and "
                                            "input embeddings define the text-DP kit."),
                  task: str = typer.Option("arc_easy", help="Task whose prompts are perturbed."),
                  split: str = typer.Option("test"),
                  data_dir: str = typer.Option("", help="Directory of TASK/SPLIT.jsonl (default: bundled data)."),
                  limit: int = typer.Option(200, help="Prompts (a seeded subsample; 0 = all)."),
                  epsilons: str = typer.Option("1,3,6,10,inf", help="Comma-separated ε per token."),
                  neighbors: int = typer.Option(64, help="N: neighbours per token in the kit."),
                  seed: int = typer.Option(0)):
    """Audit token-level text DP: what a server-side embedding-inversion attacker recovers at each ε (the
    per-token attacks only; ``fedkt audit`` runs these and the contextual ones)."""
    # deferred: a command imports what it runs; `fedkt --help` loads no torch
    from fedkt.algorithms.fedcot_prompts import question_segments
    from fedkt.privacy.audit import render_audit_table, text_dp_audit

    eps = [float(e) for e in epsilons.split(",") if e.strip()]
    progress.enable()
    try:
        _, tok, kit, exs = _audit_inputs(model, task, split, data_dir, limit, neighbors, seed)
        rows = text_dp_audit([question_segments(e.question, e.choices) for e in exs], kit, tok, eps, seed=seed,
                             top_k=min(10, neighbors))
    finally:
        progress.disable()
    typer.echo(f"{len(exs)} {task} {split} prompts, kit N={neighbors} ({model})\n")
    typer.echo(render_audit_table(rows))


@app.command("audit")
def audit(model: str = typer.Option("builtin:smollm2-135m", help="The server LLM: its tokenizer + input embeddings "
                                    "define the text-DP kit, and it is the attacker's LM prior and restorer."),
          task: str = typer.Option("arc_easy", help="Task whose prompts are attacked."),
          split: str = typer.Option("test"),
          data_dir: str = typer.Option("", help="Directory of TASK/SPLIT.jsonl (default: bundled data)."),
          limit: int = typer.Option(20, help="Prompts (a seeded subsample); each gets a planted canary."),
          epsilons: str = typer.Option("1,3,6,10,inf", help="Comma-separated ε per token."),
          neighbors: int = typer.Option(64, help="N: neighbours per token in the kit."),
          beam: int = typer.Option(4, help="Contextual attack: beam width."),
          top_k: int = typer.Option(16, help="Contextual attack: channel candidates per position."),
          lm_top: int = typer.Option(16, help="Contextual attack: LM candidates per position and beam."),
          restore: bool = typer.Option(True, help="Also ask the model to restore each perturbed prompt."),
          exposure_candidates: int = typer.Option(1000, help="N for canary exposure (random 4-digit secrets)."),
          membership: bool = typer.Option(False, help="Also train LoRA adapters on a canary and attack them "
                                          "(plain, secure aggregation, DP-SGD): minutes on a real model."),
          membership_steps: int = typer.Option(40, help="Training steps per adapter in --membership."),
          seed: int = typer.Option(0),
          json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results here.")):
    """Attack the privacy mechanisms: text-DP attacks (nearest embedding, MAP, contextual LM beam, LLM
    restore) with canary recovery, and canary exposure (docs/privacy-attacks.md)."""
    # deferred: a command imports what it runs; `fedkt --help` loads no torch
    from fedkt.algorithms.fedcot import render_question
    from fedkt.models import load_model
    from fedkt.privacy.attacks_text import AttackSetting
    from fedkt.privacy.audit_run import render_audit, run_audit

    eps = [float(e) for e in epsilons.split(",") if e.strip()]
    m, tok, kit, exs = _audit_inputs(model, task, split, data_dir, limit, neighbors, seed)
    mem, mem_model = None, None
    if membership:
        # deferred: a command imports what it runs; `fedkt --help` loads no torch
        from fedkt.config import LoraSettings
        from fedkt.models import add_lora
        from fedkt.privacy.membership import MembershipSetting

        mem_model, _ = load_model(model)
        mem_model = add_lora(mem_model, LoraSettings(dropout=0.0), seed=seed)
        mem = MembershipSetting(steps=membership_steps, n_candidates=exposure_candidates, canaries=2)
    progress.enable()
    try:
        res = run_audit(m, tok, kit, [render_question(e) for e in exs], eps, seed=seed,
                        setting=AttackSetting(beam=beam, top_k=top_k, lm_top=lm_top, restore=restore),
                        exposure_candidates=exposure_candidates, membership=mem, membership_model=mem_model)
    finally:
        progress.disable()
    typer.echo(f"{len(exs)} {task} {split} prompts, kit N={neighbors}, attacker LM {model}\n")
    typer.echo(render_audit(res))
    if json_out:
        json_out.write_text(json.dumps(res, indent=1, default=str))


@app.command("methods")
def methods_():
    """List the registered methods (name, whether it needs a server LLM, its config section)."""
    # deferred: a command imports what it runs; `fedkt --help` loads no torch
    from fedkt import registry

    for name, spec in registry.methods().items():
        extra = ", ".join(x for x in ("needs model.llm" if spec.needs_llm else "",
                                      f"settings: [{name}]" if spec.config else "") if x)
        typer.echo(f"{name:12s} {spec.label:12s} {spec.summary}" + (f" ({extra})" if extra else ""))


@app.command()
def report(run_dirs: list[Path] = typer.Argument(..., help="A run directory holding results.json; several "
                                                 "runs of one experiment under different seeds: mean ± sd."),
           out: Optional[Path] = typer.Option(None, help="With several runs: also write the summary here.")):
    """Re-render report.md (tables + plot) from a run's results.json; with several runs (one per seed), print
    one table of mean ± sd per method, role and task."""
    if len(run_dirs) == 1:
        # deferred: a command imports what it runs; `fedkt --help` loads no torch
        from fedkt.report import report_from_dir

        if out is not None:
            raise typer.BadParameter("--out is for several runs; one run's report is its report.md")
        typer.echo(report_from_dir(run_dirs[0]).read_text())
        return
    # deferred: a command imports what it runs; `fedkt --help` loads no torch
    from fedkt.report_seeds import seeds_summary

    try:
        text = seeds_summary(run_dirs)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None
    if out is not None:
        out.write_text(text)
    typer.echo(text)


@app.command("derive-slm")
def derive_slm(config: Optional[Path] = typer.Argument(None, help="TOML with a [derive] table (optional)."),
               parent: Optional[str] = typer.Option(None, help="Parent model spec."),
               out: Optional[Path] = typer.Option(None, help="Output model directory."),
               layers: Optional[str] = typer.Option(None, help="Comma-separated parent layers to keep."),
               num_layers: Optional[int] = typer.Option(None, help="Number of layers to keep."),
               steps: Optional[int] = typer.Option(None, help="Healing (distillation) steps; 0 = no healing."),
               set_: List[str] = typer.Option([], "--set", help="Override a derive key, e.g. --set lr=1e-3."),
               quiet: bool = typer.Option(False, "--quiet")):
    """Derive a smaller same-tokenizer model from a parent by layer selection + distillation healing."""
    # deferred: a command imports what it runs; `fedkt --help` loads no torch
    from fedkt.config import ConfigError, load_section
    from fedkt.derive import DeriveConfig, derive

    cfg = load_section(DeriveConfig, config, "derive", set_, values={
        "parent": parent, "out": str(out) if out else None, "num_layers": num_layers, "steps": steps,
        "layers": [int(x) for x in layers.split(",")] if layers else None})
    if not cfg.out:
        raise ConfigError("derive.out: give the output directory (--out DIR)")
    if not quiet:
        progress.enable()
    try:
        card = derive(cfg)
    finally:
        progress.disable()
    typer.echo(json.dumps(card, indent=2))


@app.command()
def models(fetch: Optional[str] = typer.Option(None, help="Build a built-in model now (e.g. smollm2-135m).")):
    """List the built-in offline models, or fetch/build one into the cache."""
    # deferred: a command imports what it runs; `fedkt --help` loads no torch
    from fedkt.builtin_models import BUILTINS, cache_dir, ensure_builtin
    from fedkt.models import load_model

    if fetch:
        progress.enable()
        try:
            path = ensure_builtin(fetch, load_model)
        finally:
            progress.disable()
        typer.echo(str(path))
        return
    for name, desc in BUILTINS.items():
        cached = (cache_dir() / name / "config.json").is_file()
        typer.echo(f"builtin:{name:14s} {'[cached] ' if cached else ''}{desc}")
    typer.echo(f"cache: {cache_dir()}")


from fedkt.federation.flower_commands import flower_app  # noqa: E402  (flwr-free; commands need the [flower] extra)

app.add_typer(flower_app, name="flower")


def main() -> None:
    # peft asks transformers about gradient checkpointing through a name transformers 5 deprecates
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # deferred: the error types' modules import torch; `fedkt --help` loads none
    from fedkt.builtin_models import ModelFetchError
    from fedkt.config import ConfigError
    from fedkt.data.tasks import DataError
    from fedkt.devices import DeviceError
    from fedkt.federation import AllClientsFailed, ClientFailure
    from fedkt.harness_eval import HarnessError
    from fedkt.models import ModelLoadError

    try:
        app()
    except (ConfigError, DataError, ModelLoadError, ModelFetchError, ClientFailure, AllClientsFailed,
            HarnessError, FileNotFoundError) as e:
        progress.disable()
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
