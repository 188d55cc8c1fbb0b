"""Zero-shot quality of a parent, its unhealed cut and the healed derived model (issue: derive-slm).

    python benchmarks/derive_quality.py --derived ~/.cache/fedkt/smollm2-slm \
        --data-dir ../shared/assets/data --tasks arc_easy,openbookqa --limit 500

Reads the derived model's card (fedkt_derive.json) for the parent and the layers kept, rebuilds the
unhealed cut from the parent, and prints parameters and acc / acc_norm for all three.
"""

import argparse
import json
import time
from pathlib import Path

from fedkt.data.partition import subsample
from fedkt.data.tasks import load_task
from fedkt.derived_model import build_child
from fedkt.evaluate import evaluate
from fedkt.seeds import derive_seed
from fedkt.models import count_parameters, load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--derived", required=True)
    ap.add_argument("--data-dir", default="../shared/assets/data")
    ap.add_argument("--tasks", default="arc_easy,openbookqa")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    card = json.loads((Path(a.derived).expanduser() / "fedkt_derive.json").read_text())
    parent, tok = load_model(card["parent"])
    models = {"parent": parent, "unhealed": build_child(parent, card["layers_kept"]),
              "healed": load_model(str(Path(a.derived).expanduser()))[0]}
    sets = {t: subsample(load_task(t, "test", a.data_dir), a.limit, derive_seed(0, "eval", t))
            for t in a.tasks.split(",")}
    out = {}
    for name, m in models.items():
        t0 = time.perf_counter()
        out[name] = {"params": count_parameters(m),
                     **{t: evaluate(m, tok, exs, 32, desc=f"{name} {t}") for t, exs in sets.items()}}
        out[name]["eval_s"] = round(time.perf_counter() - t0, 1)
        row = "  ".join(f"{t}: acc {out[name][t]['acc']:.3f} acc_norm {out[name][t]['acc_norm']:.3f} (n={out[name][t]['n']})"
                        for t in sets)
        print(f"{name:9s} {out[name]['params'] / 1e6:6.1f}M  {row}  [{out[name]['eval_s']}s]", flush=True)
    print("card:", json.dumps({k: card[k] for k in ("layers_kept", "healing_steps", "healing_tokens",
                                                      "final_kd_loss", "heldout_before", "heldout_after",
                                                      "parent_heldout_ppl", "build_seconds")}))
    if a.json:
        Path(a.json).write_text(json.dumps({"models": out, "card": card}, indent=2))


if __name__ == "__main__":
    main()
