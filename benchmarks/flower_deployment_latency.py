"""One tiny FedAvg experiment in process (``fedkt run``) and over a real local Flower deployment (``fedkt
flower run``: a SuperLink + one SuperNode per client as processes on 127.0.0.1, insecure), per round.

    nice -n 19 /work/venvs/flower/bin/python benchmarks/flower_deployment_latency.py --clients 2 --rounds 2

Needs the ``flower`` extra. A tiny random Llama built in code (``benchlib``), each client one JSONL file of
``--per-client`` bundled ARC-Easy training rows (``partition.scheme = "files"`` in process, a client file
per SuperNode in deployment), evaluation on ``--eval`` bundled test questions every round.

Prints, per round and runtime: the round's wall time (``round_s`` of metrics.jsonl: the fit call with the
clients' training, and the aggregation) and its evaluation, fedkt's metered bytes (the byte ledger, the
same in both runtimes), and for the deployment the bytes of the Flower objects those messages deflate to
(``flower_wire_bytes`` of the messages rebuilt from the checkpoints: down exactly, up as the ledger's
bytes plus Flower's framing of a reply of that shape; Flower's objects are content-addressed, so identical
arrays, like the initial adapter's all-zero B matrices, travel once per message). Also the one-off
costs: starting the deployment, and the run's wall time outside its rounds (ServerApp start, model load,
node discovery, saving). Whether the two runs' adapters are identical is printed too.
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

from benchlib import make_tiny_model, run_deployed  # noqa: E402


def write_experiment(root: Path, slm: Path, files: list[Path], rounds: int, eval_limit: int) -> Path:
    text = f"""name = "flower-latency"
seed = 0
methods = ["fedavg"]

[model]
slm = "{slm}"
threads = 1

[partition]
scheme = "files"
num_clients = {len(files)}
files = {json.dumps([str(f) for f in files])}
aux_size = 0

[federation]
rounds = {rounds}

[train]
batch_size = 4
lr = 0.005

[eval]
limit = {eval_limit}
batch_size = 16

[lora]
r = 4
target_modules = ["q_proj", "v_proj"]
"""
    path = root / "experiment.toml"
    path.write_text(text)
    return path


def round_rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r for r in rows if r["method"] == "fedavg" and r["role"] == "slm"}


def wire_bytes(out: Path, cfg, comm: dict[int, dict], clients: list[str], sizes: dict[str, int]) -> dict[int, dict]:
    """Flower bytes of each round's messages, rebuilt: down = {θ^(r-1), round, epochs}, exactly what the
    server sent (checked against the ledger); up = the ledger's bytes plus Flower's framing of a reply of
    the same shape {trained adapter, num_examples, loss, steps}."""
    from safetensors.torch import load_file

    from fedkt.clients import lora_seed
    from fedkt.federation import Message, codec, flower_codec
    from fedkt.federation.flower_protocol import flower_wire_bytes
    from fedkt.models import load_lora_model

    init = load_lora_model(cfg.model.slm, cfg.model.dtype, cfg.lora, lora_seed(cfg.seed)).init_adapter
    out_bytes = {}
    for r, c in comm.items():
        prev = init if r == 1 else load_file(str(out / "checkpoints" / "fedavg" / f"round_{r - 1:03d}" / "slm.safetensors"))
        down = Message(tensors=prev, meta={"round": r, "epochs": cfg.train.epochs})
        assert len(clients) * len(codec.encode(down)) == c["down_bytes"], "rebuilt down message != ledger"
        # a trained adapter's shape and values (θ^r; not θ^(r-1): Flower stores identical arrays once, and
        # the initial adapter's B matrices are all zeros)
        new = load_file(str(out / "checkpoints" / "fedavg" / f"round_{r:03d}" / "slm.safetensors"))
        ups = [Message(tensors=new, meta={"num_examples": sizes[k], "loss": 5.123456789012345, "steps": 3})
               for k in clients]
        framing = sum(flower_wire_bytes(flower_codec.encode(m)) - len(codec.encode(m)) for m in ups)
        out_bytes[r] = {"down": len(clients) * flower_wire_bytes(flower_codec.encode(down)),
                        "up": c["up_bytes"] + framing}
    return out_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--per-client", type=int, default=16, help="training rows per client")
    ap.add_argument("--eval", type=int, default=20, help="ARC-Easy test questions evaluated each round")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    a = ap.parse_args()

    import torch

    from fedkt.registry import load_config
    from fedkt.data.tasks import bundled_dir
    from fedkt.models import load_adapter_state
    from fedkt.experiment import run_experiment

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="fedkt-flower-latency-"))
    try:
        slm = make_tiny_model(root, "slm", 2, 32, 1)
        rows = (bundled_dir() / "arc_easy" / "train.jsonl").read_text().splitlines()
        clients = [f"client{i}" for i in range(a.clients)]
        files, client_files = [], {}
        for i, c in enumerate(clients):
            f = root / "orgs" / c / "train.jsonl"
            f.parent.mkdir(parents=True)
            f.write_text("\n".join(rows[i * a.per_client:(i + 1) * a.per_client]) + "\n")
            files.append(f)
            client_files[c] = f.parent / "client.toml"
            client_files[c].write_text(f'[client]\ncid = "{c}"\ndata_files = ["train.jsonl"]\n')
        config = write_experiment(root, slm, files, a.rounds, a.eval)
        cfg = load_config(config)

        t0 = time.perf_counter()
        local = run_experiment(cfg, root / "local")["methods"]["fedavg"]
        local_wall = time.perf_counter() - t0

        start_s, flower_wall = run_deployed(config, root / "flower", root, clients, client_files, timeout=1800)
        flower = json.loads((root / "flower" / "results.json").read_text())["methods"]["fedavg"]

        lr, fr = round_rows(root / "local"), round_rows(root / "flower")
        lc = {e["round"]: e for e in local["comm"]["per_round"]}
        fc = {e["round"]: e for e in flower["comm"]["per_round"]}
        sizes = {c: len(rows[i * a.per_client:(i + 1) * a.per_client]) for i, c in enumerate(clients)}
        wire = wire_bytes(root / "flower", cfg, fc, clients, sizes)
        print(f"tiny FedAvg: {a.clients} clients x {a.per_client} rows, {a.rounds} rounds, eval {a.eval} questions, "
              f"adapter {sum(v.numel() for v in load_adapter_state(root / 'local' / 'adapters' / 'fedavg' / 'slm').values())}"
              " floats")
        print(f"{'round':>5} | {'in-process s':>12} {'eval s':>7} | {'deployed s':>10} {'eval s':>7} | "
              f"{'ledger down':>11} {'ledger up':>10} | {'Flower down':>11} {'Flower up':>10}")
        for r in range(1, a.rounds + 1):
            assert lc[r]["down_bytes"] == fc[r]["down_bytes"] and lc[r]["up_bytes"] == fc[r]["up_bytes"]
            print(f"{r:>5} | {lr[r]['round_s']:>12.2f} {lr[r]['eval_s']:>7.2f} | {fr[r]['round_s']:>10.2f} "
                  f"{fr[r]['eval_s']:>7.2f} | {fc[r]['down_bytes']:>11,} {fc[r]['up_bytes']:>10,} | "
                  f"{wire[r]['down']:>11,} {wire[r]['up']:>10,}")
        rounds_local = sum(lr[r]["round_s"] + lr[r]["eval_s"] for r in lr)
        rounds_flower = sum(fr[r]["round_s"] + fr[r]["eval_s"] for r in fr)
        print(f"run wall time: in process {local_wall:.1f} s ({local_wall - rounds_local:.1f} s outside rounds); "
              f"deployed {flower_wall:.1f} s (`fedkt flower run`, {flower_wall - rounds_flower:.1f} s outside rounds: "
              f"ServerApp start, model load, node discovery, saving); deployment start {start_s:.1f} s")
        a_local = load_adapter_state(root / "local" / "adapters" / "fedavg" / "slm")
        a_flower = load_adapter_state(root / "flower" / "adapters" / "fedavg" / "slm")
        same = all(torch.equal(a_local[k], a_flower[k]) for k in a_local)
        print(f"final adapters identical: {same}; accuracy in process {local['slm']}, deployed {flower['slm']}")
        if a.keep:
            shutil.copytree(root, a.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
