"""results.json -> report.md: paper-style tables (client SLMs, server LLM, communication) + a plot.

Reads :class:`~fedkt.run_results.RunResults`; method labels and their order come from the method registry
(baselines, federated methods, centralized), so a newly registered method appears without edits here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedkt import registry
from fedkt.privacy.attacks_text import render_attack_table
from fedkt.privacy.audit import render_audit_table
from fedkt.privacy.randomness import describe
from fedkt.report_paired import TASK_NAMES, section as paired_section
from fedkt.run_results import RunResults


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _name(method: str) -> str:
    return registry.label(method)


def _ordered(results: RunResults) -> list[tuple[str, dict]]:
    """Methods in the papers' order (baselines, federated, centralized), whatever order they ran in, as
    their results.json entries."""
    rank = {m: i for i, m in enumerate(registry.methods())}
    return sorted(((m, r.to_dict()) for m, r in results.methods.items()), key=lambda kv: rank.get(kv[0], len(rank)))


def accuracy_table(results: RunResults, role: str) -> str:
    rows = [(m, r[role]) for m, r in _ordered(results) if r.get(role)]
    if not rows:
        return ""
    tasks = list(rows[0][1])
    head = "| Method | " + " | ".join(TASK_NAMES.get(t, t) for t in tasks) + " | Avg |"
    lines = [head, "|---" * (len(tasks) + 2) + "|"]
    for m, metrics in rows:
        accs = [metrics[t]["acc"] for t in tasks if t in metrics]
        cells = []
        for t in tasks:
            x = metrics.get(t)
            if not x:
                cells.append("–")
            elif "acc_norm" in x:
                cells.append(f"{100 * x['acc']:.1f} ({100 * x['acc_norm']:.1f})")
            else:
                cells.append(f"{100 * x['acc']:.1f}")
        avg = f"{100 * sum(accs) / len(accs):.1f}" if accs else "–"
        lines.append(f"| {_name(m)} | " + " | ".join(cells) + f" | {avg} |")
    n = {t: rows[0][1][t].get("n") for t in tasks}
    lines.append("")
    lines.append("acc in %, acc_norm (length-normalised) in parentheses; questions scored: "
                 + ", ".join(f"{TASK_NAMES.get(t, t)} {v}" for t, v in n.items()) + ".")
    return "\n".join(lines)


def _tasks(results: RunResults) -> list[str]:
    """The tasks of the first method's first role (runs without a data summary)."""
    for _, r in _ordered(results):
        for role in ("llm", "slm"):
            if r.get(role):
                return list(r[role])
    return []


def comm_table(results: RunResults) -> str:
    models = results.models or {}
    slm = models.get("slm", {})
    lines = ["| Method | Rounds | Up / client / round | Down / client / round | Total up | Total down |"
             " % of SLM adapter | % of full SLM |", "|---|---|---|---|---|---|---|---|"]
    any_row = False
    for m, r in _ordered(results):
        comm = r.get("comm")
        if not comm or not comm["per_round"]:
            continue
        any_row = True
        pr = comm["per_round"]
        # per client per round: divide by the client-rounds that really took part (skipped clients and
        # rounds with fewer clients are not counted as if they had sent something)
        client_rounds = sum(len(x["clients"]) for x in pr)
        up = comm["up_bytes"] / client_rounds
        down = comm["down_bytes"] / client_rounds
        pa = f"{100 * up / slm['adapter_bytes']:.1f}%" if slm.get("adapter_bytes") else "–"
        pf = f"{100 * up / slm['model_bytes']:.2f}%" if slm.get("model_bytes") else "–"
        lines.append(f"| {_name(m)} | {len(pr)} | {_fmt_bytes(up)} | {_fmt_bytes(down)} | "
                     f"{_fmt_bytes(comm['up_bytes'])} | {_fmt_bytes(comm['down_bytes'])} | {pa} | {pf} |")
    if not any_row:
        return ""
    note = []
    for role in ("slm", "llm"):
        if role in models:
            x = models[role]
            note.append(f"{role.upper()} {x['spec']}: {x['params'] / 1e6:.1f}M params "
                        f"({_fmt_bytes(x['model_bytes'])}); LoRA adapter {x['adapter_params'] / 1e6:.3f}M params "
                        f"({_fmt_bytes(x['adapter_bytes'])}, {100 * x['adapter_fraction']:.2f}% of the model)")
    return "\n".join(lines) + "\n\nBytes are the serialised payloads (adapter tensors + JSON metadata). " + "; ".join(note) + "."


def privacy_tables(results: RunResults) -> str:
    """Per-client privacy budgets and the text-DP audit, for methods whose rounds report them."""
    parts = []
    for m, r in _ordered(results):
        first = next((e for e in r.get("per_round") or [] if e.get("privacy")), None)
        if not first:
            continue
        lines = [f"## Privacy: {_name(m)}", "", "| Client | ε per token | tokens sent | mean ε per prompt | max ε per prompt "
                 "| randomness |", "|---|---|---|---|---|---|"]
        for cid, p in first["privacy"].items():
            eps = "∞" if p["epsilon_per_token"] == float("inf") else f"{p['epsilon_per_token']:g}"
            mean = "∞" if p["prompt_epsilon_mean"] == float("inf") else f"{p['prompt_epsilon_mean']:.0f}"
            mx = "∞" if p["prompt_epsilon_max"] == float("inf") else f"{p['prompt_epsilon_max']:.0f}"
            lines.append(f"| {cid} | {eps} | {p['tokens']} | {mean} | {mx} | {p.get('randomness', '–')} |")
        lines += ["", "ε is pure ε-DP per token (exponential mechanism); a prompt's total is its token count × ε under "
                  "basic composition. Later rounds reuse the kept rationales and spend nothing more."]
        modes = sorted({p.get("randomness") for p in first["privacy"].values()} - {None})
        if modes:
            lines += ["", "Randomness: " + " ".join(f"{mode}: {describe(mode)}." for mode in modes)]
        if first.get("audit"):
            lines += ["", f"Text-DP audit on {first['audit'][0]['n_texts']} public prompts of the same format "
                      "(server-side attacker; docs/text-dp.md):", "", render_audit_table(first["audit"])]
        if first.get("attack"):
            a = first["attack"]
            lines += ["", f"Contextual attack on {a[0]['n_texts']} public prompts with planted canaries (noisy-channel "
                      f"beam {a[0]['setting']['beam']} with the server LLM as LM prior; token recovery / exact canary "
                      "recovery; docs/privacy-attacks.md; `fedcot.attack_prompts = 0` turns it off):", "",
                      render_attack_table(a)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot_rounds(results: RunResults, out: Path) -> str | None:
    """Accuracy per round of the federated methods (round 0 = zero-shot, where it ran), with the other
    methods as horizontal reference lines; one panel per task."""
    methods = dict(_ordered(results))
    zero = methods.get("zero_shot", {})
    series = []
    for m, r in methods.items():
        for role in ("slm", "llm"):
            pts = [(x["round"], x[role]) for x in r.get("per_round", []) if x.get(role)]
            if pts:
                if zero.get(role):
                    pts = [(0, zero[role])] + pts
                series.append((m, role, pts))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(series[0][2][-1][1])
    colors = {m: f"C{i}" for i, m in enumerate(registry.methods())}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for m, role, pts in series:
            ax.plot([p[0] for p in pts], [100 * p[1][task]["acc"] for p in pts], marker="o",
                    linestyle="-" if role == "slm" else "--", color=colors.get(m),
                    label=f"{_name(m)} {role.upper()}")
        for m, r in methods.items():
            if r.get("per_round") or m == "zero_shot":
                continue
            for role, style in (("slm", ":"), ("llm", "-.")):
                if r.get(role) and task in r[role]:
                    ax.axhline(100 * r[role][task]["acc"], linestyle=style, linewidth=1.2, color=colors.get(m),
                               label=f"{_name(m)} {role.upper()}")
        rounds = sorted({p[0] for _, _, pts in series for p in pts})
        ax.set_xticks(rounds)
        ax.set_title(TASK_NAMES.get(task, task))
        ax.set_xlabel("round (0 = zero-shot)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "accuracy_per_round.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _setup_line(results: RunResults) -> str:
    """How the numbers were produced: questions and prompt format per task (``eval.format``), and each
    role's device and precision (results of fedkt versions that did not record them: what is known)."""
    data, bits = results.data or {}, []
    if data.get("eval"):
        fmt = data.get("format") or {}
        bits.append("Evaluated on " + ", ".join(f"{t} ({n} questions" + (f", {fmt[t]} format)" if t in fmt else ")")
                                                 for t, n in data["eval"].items()))
    roles = [f"{role.upper()} on {m['device']} in {m['dtype']}" for role, m in (results.models or {}).items()
             if m.get("device") and m.get("dtype")]
    if roles:
        bits.append("; ".join(roles))
    return ". ".join(bits) + "." if bits else ""


def render(results: RunResults | dict[str, Any], out: Path | None = None) -> str:
    if isinstance(results, dict):
        results = RunResults.from_dict(results)
    parts = [f"# {results.name}", ""]
    data = results.data
    if data:
        parts += [f"Clients: {len(data['clients'])} with {data['clients']} training examples; server "
                  f"auxiliary set: {data['aux']} examples.", ""]
    setup = _setup_line(results)
    if setup:
        parts += [setup, ""]
    llm = accuracy_table(results, "llm")
    if llm:
        parts += ["## Server LLM", "", llm, ""]
    slm = accuracy_table(results, "slm")
    if slm:
        parts += ["## Client SLMs", "", "Standalone is the mean over clients; after FedAvg/FedCoLLM every "
                  "client holds the same global adapter.", "", slm, ""]
    if llm or slm:
        parts += [paired_section([results], list((results.data or {}).get("eval") or results.questions or
                                                 _tasks(results)))]
    comm = comm_table(results)
    if comm:
        parts += ["## Communication", "", comm, ""]
    privacy = privacy_tables(results)
    if privacy:
        parts += [privacy, ""]
    for m, r in _ordered(results):  # sections a method renders itself (MethodSpec.report)
        spec = registry.methods().get(m)
        section = spec.report(r) if spec is not None and spec.report is not None else ""
        if section:
            parts += [section, ""]
    timing = [(m, r["wall_s"], r.get("timings")) for m, r in _ordered(results) if "wall_s" in r]
    if timing:
        parts += ["## Wall time", "", "| Method | Total (s) | Breakdown (s) |", "|---|---|---|"]
        for m, w, t in timing:
            br = ", ".join(f"{k.removesuffix('_s')} {v:.0f}" for k, v in (t or {}).items())
            parts.append(f"| {_name(m)} | {w:.0f} | {br or '–'} |")
        parts.append("")
    if out is not None:
        png = plot_rounds(results, out)
        if png:
            parts += ["## Accuracy per round", "", f"![accuracy per round]({png})", ""]
    return "\n".join(parts)


def write_report(results: RunResults | dict[str, Any], out: Path) -> Path:
    path = out / "report.md"
    path.write_text(render(results, out))
    return path


def read_results(run_dir: str | Path) -> RunResults:
    """A run directory's results.json; a clear error if it has none."""
    f = Path(run_dir) / "results.json"
    if not f.is_file():
        raise FileNotFoundError(f"{run_dir} holds no results.json (is it a fedkt run directory?)")
    return RunResults.from_dict(json.loads(f.read_text()))


def report_from_dir(run_dir: str | Path) -> Path:
    return write_report(read_results(run_dir), Path(run_dir))
