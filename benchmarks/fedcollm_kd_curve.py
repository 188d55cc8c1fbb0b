"""FedCoLLM's server distillation as a curve: the SLM's test and validation accuracy after every few KD steps.

Takes an SLM adapter a finished run saved (default: FedAvg's aggregate after ``--round``, a stand-in for the
aggregate FedCoLLM's server distils) and the LLM adapter (FedCoLLM's after round ``--round`` − 1, or the
fresh one), splits the config's auxiliary set Dᵃ into distillation and validation parts
(``fedcollm.validation_fraction``, default 0.5 here) and runs the server's mutual distillation for
``fedcollm.kd_steps`` steps, scoring every ``fedcollm.select_every`` steps both the validation part (what
``select = "best"`` sees) and the test subsample (what the report measures). Server-side only: no clients,
no other round. Prints one row per scored step; writes ``curve.json`` under ``--out``.

  /work/wt/heavy python benchmarks/fedcollm_kd_curve.py --run /tmp/fedcollm-runs/base-s0/run --round 2 \\
      --out /tmp/fedcollm-runs/curve-r2 --set fedcollm.kd_steps=32 --set fedcollm.select_every=4 \\
      --set model.threads=1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from fedkt.algorithms import fedcollm_select as fs  # noqa: E402
from fedkt.algorithms.fedcollm import FedCoLLMConfig, mutual_distill  # noqa: E402
from fedkt.evaluate import choice_loglikelihoods, predictions  # noqa: E402
from fedkt.experiment import set_threads  # noqa: E402
from fedkt.registry import load_config  # noqa: E402
from fedkt.seeds import derive_seed  # noqa: E402
from fedkt.simulation import Simulation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/quickstart.toml")
    ap.add_argument("--run", required=True, type=Path, help="a finished run directory (its checkpoints/)")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--slm-from", default="fedavg", help="method whose round checkpoint gives the SLM adapter")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    a = ap.parse_args()
    sets = ["fedcollm.validation_fraction=0.5", "fedcollm.select_every=4", *a.sets]
    cfg = load_config(a.config, sets)
    set_threads(cfg)
    kd = cfg.section(FedCoLLMConfig)
    a.out.mkdir(parents=True, exist_ok=True)
    server = Simulation(cfg, a.out).server()
    theta = load_file(str(a.run / "checkpoints" / a.slm_from / f"round_{a.round:03d}" / "slm.safetensors"))
    omega = (load_file(str(a.run / "checkpoints" / "fedcollm" / f"round_{a.round - 1:03d}" / "llm.safetensors"))
             if a.round > 1 else None)
    train, val = fs.split_validation(server.aux, kd.validation_fraction, cfg.seed)
    test = [ex for exs in server.eval_sets.values() for ex in exs]
    rows: list[dict] = []
    real = fs.validation_score

    def scored(model, tok, examples, batch_size, desc="validate"):
        s = real(model, tok, examples, batch_size, desc)
        side = desc.split("validate ")[1][0]
        row = {"side": side, "val_acc": s.acc, "val_loglik": s.loglik}
        if side == "g":
            lls = choice_loglikelihoods(model, tok, test, batch_size, f"{desc} test")
            row["test_acc"] = sum(predictions(ex, ll)[0] == ex.answer for ex, ll in zip(test, lls)) / len(test)
        rows.append(row)
        return s

    fs.validation_score = scored
    slm, llm = server.slm.use(theta), server.llm.use(omega)
    stats = mutual_distill(slm, llm, server.slm.tokenizer, train, kd, cfg.train.max_length, cfg.train.max_grad_norm,
                           seed=derive_seed(cfg.seed, "kd", a.round), desc=f"curve r{a.round}", val=val,
                           val_batch_size=cfg.eval.batch_size)
    g = [r for r in rows if r["side"] == "g"]
    f = [r for r in rows if r["side"] == "f"]
    print(f"round {a.round}, SLM from {a.slm_from}, Dᵃ {len(train)} distil + {len(val)} validation, "
          f"test {len(test)}; {' '.join(sets)}")
    print("| KD step | SLM val acc | SLM val loglik | SLM test acc | LLM val acc |")
    print("|---|---|---|---|---|")
    for step, rg, rf in zip(stats["val_steps_g"], g, f):
        print(f"| {step} | {100 * rg['val_acc']:.1f} | {rg['val_loglik']:.3f} | {100 * rg['test_acc']:.1f} | "
              f"{100 * rf['val_acc']:.1f} |")
    print("losses:", {k: round(v, 3) for k, v in stats.items() if k.endswith(("_first", "_last"))})
    (a.out / "curve.json").write_text(json.dumps({"sets": sets, "round": a.round, "rows": rows, "stats": stats},
                                                 indent=1))


if __name__ == "__main__":
    main()
