"""One experiment run twice: in process (``fedkt run``) and over a real local Flower deployment (``fedkt
flower run``: a SuperLink + one SuperNode per client as processes on 127.0.0.1, insecure), compared.

    python benchmarks/flower_vs_inprocess.py --config examples/quickstart.toml \\
        --set 'methods=["fedcollm"]' --set eval.limit=200 --keep runs/flower-vs-inprocess

Needs the ``flower`` extra. The in-process run is ``fedkt run`` of the config as given (its partition,
e.g. ``iid``). Each client's shard of that run is written to its own JSONL file and ``client.toml``; the
deployment's SuperNodes read their data from those files only, and the deployed server draws its
auxiliary set from the public task data exactly as in process (``flower_experiment.deployment_server``).
Both runs use ``model.threads = 1`` (a thread count changes the order of floating-point reductions).

Prints, per method and role, the accuracies per round of both runs, whether the saved adapters are
identical bit for bit, the metered bytes of both, and the wall times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from benchlib import run_deployed  # noqa: E402


def write_shard(path: Path, examples) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"id": e.id, "question": e.question, "choices": list(e.choices),
                                "answer": e.answer}) + "\n")


def rounds(res: dict, method: str, role: str) -> list[dict]:
    return [{t: round(100 * v["acc"], 2) for t, v in (r.get(role) or {}).items()}
            for r in res["methods"][method].get("per_round") or []]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/quickstart.toml")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds for the deployed run")
    a = ap.parse_args()

    import torch

    from fedkt import progress
    from fedkt.config import dump_toml
    from fedkt.registry import load_config
    from fedkt.data.tasks import load_jsonl
    from fedkt.models import load_adapter_state
    from fedkt.experiment import run_experiment
    from fedkt.simulation import load_client_data

    cfg = load_config(a.config, [*a.sets, "model.threads=1"])
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="fedkt-flower-vs-inprocess-"))
    progress.enable()
    try:
        config = root / "experiment.toml"
        config.write_text(dump_toml(cfg))
        shards, aux = load_client_data(cfg)
        clients = [f"client{i}" for i in range(len(shards))]
        client_files = {}
        for c, shard in zip(clients, shards):
            f = root / "orgs" / c / "train.jsonl"
            write_shard(f, shard)
            back = load_jsonl(f, task=cfg.data.tasks[0])
            assert [(e.question, e.choices, e.answer) for e in back] == \
                   [(e.question, e.choices, e.answer) for e in shard], f"{c}: shard did not round-trip"
            client_files[c] = f.parent / "client.toml"
            client_files[c].write_text(f'[client]\ncid = "{c}"\ndata_files = ["train.jsonl"]\nworkdir = "state"\n')
        print(f"{len(clients)} clients x {[len(s) for s in shards]} examples, aux {len(aux)}, "
              f"methods {cfg.methods}", flush=True)

        t0 = time.perf_counter()
        local = run_experiment(cfg, root / "local")
        local_wall = time.perf_counter() - t0
        print(f"in process: {local_wall:.0f} s", flush=True)

        start_s, flower_wall = run_deployed(config, root / "flower", root, clients, client_files, timeout=a.timeout)
        flower = json.loads((root / "flower" / "results.json").read_text())
        print(f"deployed: {flower_wall:.0f} s (deployment start {start_s:.1f} s)\n")

        for m in cfg.methods:
            lm, fm = local["methods"][m], flower["methods"][m]
            for role in ("slm", "llm"):
                if not lm.get(role):
                    continue
                print(f"{m} {role}: final acc in process {json.dumps({t: v['acc'] for t, v in lm[role].items()})}")
                print(f"{m} {role}: final acc deployed   {json.dumps({t: v['acc'] for t, v in fm[role].items()})}")
                print(f"{m} {role}: per round in process {rounds(local, m, role)}; deployed {rounds(flower, m, role)}")
                print(f"{m} {role}: final scores identical: {lm[role] == fm[role]}")
                da, db = root / "local" / "adapters" / m / role, root / "flower" / "adapters" / m / role
                if da.exists() and db.exists():
                    sa, sb = load_adapter_state(da), load_adapter_state(db)
                    same = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
                    diff = max((float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if k in sb), default=0.0)
                    print(f"{m} {role}: saved adapters identical: {same} (max |difference| {diff:.3g})")
            print(f"{m}: bytes in process {lm['comm']['down_bytes']:,} down / {lm['comm']['up_bytes']:,} up; "
                  f"deployed {fm['comm']['down_bytes']:,} / {fm['comm']['up_bytes']:,}; "
                  f"per-round results identical: {lm.get('per_round') == fm.get('per_round')}")
            print(f"{m}: wall in process {lm.get('wall_s', 0):.0f} s {lm.get('timings')}; "
                  f"deployed {fm.get('wall_s', 0):.0f} s {fm.get('timings')}")
        if a.keep:
            shutil.copytree(root, a.keep, dirs_exist_ok=True)
    finally:
        progress.disable()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
