"""Framework overhead: FedAvg / FedCoLLM rounds through fedkt against a bare PyTorch + peft loop.

    PYTHONPATH=src python benchmarks/framework_overhead.py --model tiny --method fedavg
    PYTHONPATH=src python benchmarks/framework_overhead.py --model 135m --method fedavg
    PYTHONPATH=src python benchmarks/framework_overhead.py --model tiny --method fedcollm
    PYTHONPATH=src python benchmarks/framework_overhead.py --model 135m --method fedcollm   # 135M LLM + 6-layer child SLM

The fedkt side is the real path: ``fedkt.experiment.run_method(server, METHOD)`` on a
``fedkt.simulation.Simulation`` (round driver, LocalFederation with codec and ledger, per-round
checkpoints, final adapter save, metrics.jsonl). Evaluation is excluded (``ServerContext.evaluate`` is
replaced by a no-op); model loading is excluded on both sides (models are loaded before timing).

The bare side does the same optimizer steps on the same batches with the same models: its own
transformers + peft models with the same LoRA config and initialisation seeds, for each client in turn
the global adapter copied into the LoRA parameters, the seeded batch order (``fedkt.train.batch_order``,
``collate_sft``), AdamW with the same warmup/linear schedule and clipping, plain Python weighted averaging
of the adapters; for FedCoLLM the same simultaneous mutual-distillation steps (CE + λ·KL both ways,
detached teachers) on the server's auxiliary data. Both sides tokenize their data the same way
(``fedkt.train.tokenize_examples``) inside the timed region.

The script first checks that both sides end with the same adapters (max |Δ|, expected ~1e-7 or 0), then
alternates bare and fedkt runs ``--reps`` times (after one warm-up pair) and prints the median wall
time of each, the median per-pair ratio, and where fedkt's extra time goes: exclusive time in codec
encode/decode, the byte ledger, adapter get/set, checkpoints, the final adapter save, metrics/log lines,
and the rest of the driver. The timing wrappers stay installed in every fedkt run (a few microseconds per
wrapped call), so the ratio is if anything an over-estimate.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import Timers, bench_config, make_tiny_pair, median  # noqa: E402

from fedkt.algorithms.fedcollm import FedCoLLMConfig  # noqa: E402
from fedkt.data.collate import IGNORE, collate_sft  # noqa: E402
from fedkt.seeds import derive_seed  # noqa: E402
from fedkt.train import batch_order, tokenize_examples  # noqa: E402


# ---------------------------------------------------------------------------------------- bare loop
def bare_lora_model(path, lora, seed: int):
    """transformers + peft directly: frozen fp32 base, fresh LoRA drawn from ``seed``; returns the model
    and its LoRA parameters keyed like peft's adapter state dict."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path).to(torch.float32).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = get_peft_model(m, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                         target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    params = {n.replace(".default", ""): p for n, p in m.named_parameters() if p.requires_grad}
    return m, params


def ce(logits, labels):
    lg, lb = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(lg.reshape(-1, lg.size(-1)).float(), lb.reshape(-1), ignore_index=IGNORE)


def kl(student, teacher, mask, T):
    t = F.log_softmax(teacher.detach().float() / T, -1)
    s = F.log_softmax(student.float() / T, -1)
    m = mask.to(t.dtype)
    return ((t.exp() * (t - s)).sum(-1) * m).sum() / m.sum().clamp_min(1.0) * T ** 2


class Bare:
    """FedAvg / FedCoLLM rounds written out by hand."""

    def __init__(self, cfg, slm_path, llm_path, clients, aux):
        from transformers import AutoTokenizer

        self.cfg, self.clients, self.aux = cfg, clients, aux
        self.tok = AutoTokenizer.from_pretrained(slm_path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.slm, self.p_slm = bare_lora_model(slm_path, cfg.lora, derive_seed(cfg.seed, "lora", "slm"))
        self.init_slm = {k: p.detach().clone() for k, p in self.p_slm.items()}
        if llm_path:
            self.llm, self.p_llm = bare_lora_model(llm_path, cfg.lora, derive_seed(cfg.seed, "lora", "llm"))
            self.init_llm = {k: p.detach().clone() for k, p in self.p_llm.items()}
        self.t = {"train": 0.0, "aggregate": 0.0, "distill": 0.0}

    @staticmethod
    def load(params, state):
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k])

    def train_client(self, examples, seed: int):
        tc = self.cfg.train
        data = tokenize_examples(self.tok, examples, tc.max_length)
        random.seed(seed)
        torch.manual_seed(seed)
        batches = batch_order(len(data), tc.batch_size, tc.epochs, seed)
        steps = min(len(batches), tc.max_steps) if tc.max_steps > 0 else len(batches)
        params = list(self.p_slm.values())
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        warm = int(round(tc.warmup_ratio * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if warm and s < warm else max(0.0, 1 - (s - warm) / max(1, steps - warm)))
        self.slm.train()
        for idx in batches[:steps]:
            b = collate_sft([data[i] for i in idx], self.tok.pad_token_id)
            loss = ce(self.slm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
        self.slm.eval()

    def fedavg_round(self, theta, rnd: int):
        t0 = time.perf_counter()
        states, weights = [], []
        for i, exs in enumerate(self.clients):
            self.load(self.p_slm, theta)
            self.train_client(exs, derive_seed(self.cfg.seed, "fit", rnd, f"client{i}"))
            states.append({k: p.detach().clone() for k, p in self.p_slm.items()})
            weights.append(len(exs))
        t1 = time.perf_counter()
        total = sum(weights)
        out = {k: (sum(s[k].double() * w for s, w in zip(states, weights)) / total).float() for k in theta}
        self.t["train"] += t1 - t0
        self.t["aggregate"] += time.perf_counter() - t1
        return out

    def distill(self, theta, omega, rnd: int):
        t0 = time.perf_counter()
        kd, tc = self.cfg.section(FedCoLLMConfig), self.cfg.train
        self.load(self.p_slm, theta)
        self.load(self.p_llm, omega)
        seed = derive_seed(self.cfg.seed, "kd", rnd)
        random.seed(seed)
        torch.manual_seed(seed)
        data = tokenize_examples(self.tok, self.aux, tc.max_length)
        pg, pf = list(self.p_slm.values()), list(self.p_llm.values())
        og = torch.optim.AdamW(pg, lr=kd.lr_slm, weight_decay=0.0)
        of = torch.optim.AdamW(pf, lr=kd.lr_llm, weight_decay=0.0)
        batches = batch_order(len(data), kd.batch_size, kd.kd_steps * kd.batch_size / len(data), seed)[:kd.kd_steps]
        self.slm.train()
        self.llm.train()
        for idx in batches:
            b = collate_sft([data[i] for i in idx], self.tok.pad_token_id)
            g = self.slm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            f = self.llm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            mask = b["attention_mask"][:, 1:].bool()
            loss_g = ce(g, b["labels"]) + kd.kd_lambda * kl(g[:, :-1], f[:, :-1], mask, kd.temperature)
            loss_f = ce(f, b["labels"]) + kd.kd_lambda * kl(f[:, :-1], g[:, :-1], mask, kd.temperature)
            (loss_g + loss_f).backward()
            for params, opt in ((pg, og), (pf, of)):
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            loss_g.item(), loss_f.item()
        self.slm.eval()
        self.llm.eval()
        out = ({k: p.detach().clone() for k, p in self.p_slm.items()},
               {k: p.detach().clone() for k, p in self.p_llm.items()})
        self.t["distill"] += time.perf_counter() - t0
        return out

    def run(self, method: str) -> dict[str, dict[str, torch.Tensor]]:
        theta = self.init_slm
        omega = self.init_llm if method == "fedcollm" else None
        for rnd in range(1, self.cfg.federation.rounds + 1):
            theta = self.fedavg_round(theta, rnd)
            if method == "fedcollm":
                theta, omega = self.distill(theta, omega, rnd)
        return {"slm": theta} if omega is None else {"slm": theta, "llm": omega}


# ------------------------------------------------------------------------------------------- fedkt side
CATEGORIES = [  # (label, owner module path, attribute, category)
    ("fedkt.federation.codec", "encode", "codec encode/decode"),
    ("fedkt.federation.codec", "decode", "codec encode/decode"),
    ("fedkt.federation.base:ByteLedger", "record", "ledger"),
    ("fedkt.federation.base:ByteLedger", "summary", "ledger"),
    ("fedkt.federation.base:Federation", "state_dict", "ledger"),
    ("fedkt.models", "set_adapter_state", "adapter get/set"),
    ("fedkt.models", "get_adapter_state", "adapter get/set"),
    ("fedkt.algorithms.fedavg", "get_adapter_state", "adapter get/set"),
    ("fedkt.algorithms.fedcollm", "get_adapter_state", "adapter get/set"),
    ("fedkt.rounds:Checkpoints", "save", "checkpoints (Checkpoints.save)"),
    ("fedkt.server:ServerContext", "save_adapter", "final adapter save (peft)"),
    ("fedkt.server:ServerContext", "log_metrics", "metrics.jsonl + progress.log"),
    ("fedkt.progress", "log", "metrics.jsonl + progress.log"),
    ("fedkt.algorithms.fedavg", "sft", "client training (sft)"),
    ("fedkt.algorithms.fedavg", "aggregate", "aggregate"),
    ("fedkt.algorithms.fedcollm", "mutual_distill", "distill"),
]
COMPUTE = ("client training (sft)", "aggregate", "distill")


def install_timers() -> Timers:
    import importlib

    import fedkt.server

    timers = Timers()
    for where, attr, cat in CATEGORIES:
        mod, _, cls = where.partition(":")
        owner = importlib.import_module(mod)
        timers.patch(getattr(owner, cls) if cls else owner, attr, cat)
    timers.replace(fedkt.server.ServerContext, "evaluate", lambda self, role, state, desc: {})  # excluded
    return timers


def max_diff(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    out = {}
    for role in b:
        if a[role].keys() != b[role].keys():
            raise SystemExit(f"{role}: adapter keys differ between fedkt and the bare loop")
        out[role] = max((a[role][k].float() - b[role][k].float()).abs().max().item() for k in b[role])
    return out


def derived_slm(root: Path, layers: int) -> Path:
    """``fedkt.derived_model.build_child`` of the 135M with ``layers`` blocks (bottom and top halves), no healing."""
    from fedkt.derived_model import build_child
    from fedkt.models import load_model

    parent, tok = load_model("builtin:smollm2-135m")
    n = parent.config.num_hidden_layers
    keep = list(range((layers + 1) // 2)) + list(range(n - layers // 2, n))
    d = root / f"slm{layers}"
    build_child(parent, keep).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "135m"], default="tiny")
    ap.add_argument("--method", choices=["fedavg", "fedcollm"], default="fedavg")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--per-client", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kd-steps", type=int, default=4)
    ap.add_argument("--aux", type=int, default=16)
    ap.add_argument("--slm-layers", type=int, default=6, help="135m FedCoLLM: layers of the derived SLM")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()

    from fedkt import registry
    from fedkt.models import load_adapter_state, resolve
    from fedkt.experiment import run_method
    from fedkt.simulation import Simulation

    tmp = Path(tempfile.mkdtemp(prefix="fedkt-overhead-"))
    llm = ""
    if a.model == "tiny":
        dirs = make_tiny_pair(tmp)
        slm = str(dirs["slm"])
        if a.method == "fedcollm":
            llm = str(dirs["llm"])
    elif a.method == "fedcollm":
        llm, slm = "builtin:smollm2-135m", str(derived_slm(tmp, a.slm_layers))
    else:
        slm = "builtin:smollm2-135m"
    aux = a.aux if a.method == "fedcollm" else 0
    cfg = bench_config(slm, [a.method], a.clients, a.per_client, aux=aux, llm=llm, extra=[
        f"train.batch_size={a.batch_size}", f"train.max_length={a.max_length}", f"federation.rounds={a.rounds}",
        f"fedcollm.kd_steps={a.kd_steps}", f"fedcollm.batch_size={a.batch_size}"])

    # models load before any timing, on both sides
    sim = Simulation(cfg, tmp / "warm")
    server = sim.server()
    spec = registry.get(a.method)
    for role in spec.algorithm().roles:
        server.model(role)
    sim.factory.load(sim.client_spec(0, a.method))
    bare = Bare(cfg, resolve(slm), resolve(llm) if llm else None, sim.clients_data, sim.aux)
    timers = install_timers()

    bare_s, fw_s, splits = [], [], []
    for rep in range(a.reps + 1):  # rep 0 is a warm-up pair
        for k in bare.t:
            bare.t[k] = 0.0
        t0 = time.perf_counter()
        bare_state = bare.run(a.method)
        tb = time.perf_counter() - t0
        out = tmp / f"rep{rep}"
        out.mkdir()
        sim.out = server.out = out
        timers.reset()
        t0 = time.perf_counter()
        run_method(server, a.method)
        tf = time.perf_counter() - t0
        if rep == 0:
            fw_state = {r: load_adapter_state(out / "adapters" / a.method / r) for r in bare_state}
            diffs = max_diff(fw_state, bare_state)
            bare_split = dict(bare.t)
            print("final adapter max |fedkt - bare|: " + ", ".join(f"{r} {d:.1e}" for r, d in diffs.items()),
                  flush=True)
            continue
        bare_s.append(tb)
        fw_s.append(tf)
        print(f"pair {rep}: bare {tb:.3f} s, fedkt {tf:.3f} s, ratio {tf / tb:.3f}", flush=True)
        splits.append({**timers.seconds, "_total": tf})
    calls = dict(timers.calls)  # of the last run (reset before each)
    timers.restore()

    steps = math.ceil(a.per_client / a.batch_size)
    desc = (f"{a.method} on {a.model} (SLM {slm}{', LLM ' + llm if llm else ''}): {a.clients} clients x "
            f"{a.per_client} examples, batch {a.batch_size}, max_length {a.max_length}, {a.rounds} rounds, "
            f"{steps} steps/client/round" + (f", {a.kd_steps} distill steps on {aux} aux" if aux else ""))
    print(desc)
    print(f"threads {torch.get_num_threads()}, LoRA r={cfg.lora.r} {'/'.join(cfg.lora.target_modules)}, "
          f"{a.reps} timed pairs after 1 warm-up pair")
    print("final adapter max |fedkt - bare|: " + ", ".join(f"{r} {d:.1e}" for r, d in diffs.items()))
    ratios = [f / b for f, b in zip(fw_s, bare_s)]
    print(f"wall per run (median): bare {median(bare_s):.3f} s   fedkt {median(fw_s):.3f} s   "
          f"ratio {median(ratios):.3f}x (median of pairs; range {min(ratios):.3f}-{max(ratios):.3f})")
    cats = [c for c in dict.fromkeys(cat for _, _, cat in CATEGORIES)]
    med = {c: median([s.get(c, 0.0) for s in splits]) for c in cats}
    other = median([s["_total"] - sum(v for k, v in s.items() if k != "_total") for s in splits])
    bare_med = median(bare_s)
    print(f"{'where fedkt time goes (median ms/run)':44s} {'ms':>9s} {'% of bare':>9s} {'calls':>6s} {'ms/call':>8s}")
    for c in cats:
        print(f"  {c:42s} {1000 * med[c]:9.2f} {100 * med[c] / bare_med:8.2f}% {calls.get(c, 0):6d} {1000 * med[c] / max(1, calls.get(c, 0)):8.2f}")
    print(f"  {'other (driver, messages, federation)':42s} {1000 * other:9.2f} {100 * other / bare_med:8.2f}%")
    overhead = median([s["_total"] - sum(s.get(c, 0.0) for c in COMPUTE) for s in splits])
    print(f"fedkt non-compute time: {1000 * overhead:.1f} ms/run = {100 * overhead / bare_med:.2f}% of bare "
          f"(accounted ratio {1 + overhead / bare_med:.3f}x, robust to CPU contention); "
          f"without the one-off final adapter save: "
          f"{100 * (overhead - med['final adapter save (peft)']) / bare_med:.2f}%")
    print("bare compute split (warm-up run, ms): " + ", ".join(f"{k} {1000 * v:.1f}" for k, v in bare_split.items()))


if __name__ == "__main__":
    main()
