"""Hostile replies against a real Flower deployment: a SuperLink and four SuperNodes as subprocesses on
127.0.0.1, the server (a ServerApp) running FedAvg rounds (``fit_round``) under ``on_client_failure = "skip"``.
Client c3's node runs a test-only ClientApp that wraps fedkt's and answers round r with hostile case r:
records no fedkt client writes (a nested-JSON bomb, a qint8 dtype, another version, an error reason with Rich
markup) and replies fedkt's checks refuse (NaN values, a bool weight, another shape, a missing meta key).
Every round completes with c0..c2, c3 is named with the reason, the aggregate is the honest mean by hand, and
the server process finishes the run (tests/test_hostile_inputs.py has the 50 cases in process).

Slow (~1.5-3 min on 2 busy cores): each Flower message starts a ``flwr-clientapp`` process."""

import json
import textwrap
import time

import pytest
import torch

pytest.importorskip("flwr")

from fedkt.federation import codec  # noqa: E402
from fedkt.federation.flower_deploy import LocalFlowerDeployment  # noqa: E402

CASES = {
    2: ("nested_meta_bomb", r"nested deeper than 64"),
    3: ("rich_markup_error", r"\[/red\] boom \[bold\]x"),
    4: ("qint8_dtype_record", r"tensor 'lora_B' has quantized dtype 'qint8'"),
    5: ("wrong_version", r"header version 2"),
    6: ("nan_values", r"'lora_B' holds NaN or infinite"),
    7: ("weight_true", r"num_examples'\] = True"),
    8: ("other_shape", r"'lora_A' is torch\.float32\[4, 3\], expected torch\.float32\[3, 4\]"),
    9: ("missing_meta_key", r"meta lacks 'num_examples'"),
}

APP = '''
import json

import torch

from fedkt.federation import Message, codec
from fedkt.federation.flower_client_app import make_client_app
from fedkt.federation.flower_protocol import client_id_of
from flwr.app import ConfigRecord, Error, RecordDict
from flwr.app import Message as FlMessage
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import ServerApp

CASES = %(cases)r


def fit(ctx, msg):
    i, rnd = int(ctx.cid[1:]), msg.meta["round"]
    A, B = msg.tensors["lora_A"] + 0.1 * (i + 1), msg.tensors["lora_B"] - 0.05 * i
    meta = {"num_examples": 10 * (i + 1), "loss": 1.0 + i}
    case = CASES.get(str(rnd), [""])[0] if ctx.cid == "c3" else ""
    if case == "nan_values":
        B = B * float("nan")
    elif case == "weight_true":
        meta["num_examples"] = True
    elif case == "other_shape":
        A = torch.zeros(4, 3)
    elif case == "missing_meta_key":
        del meta["num_examples"]
    return Message(tensors={"lora_A": A, "lora_B": B}, meta=meta)


inner = make_client_app({"fit": fit})
client_app = ClientApp()


@client_app.query("_fedkt_identify")
def identify(message, context):
    return inner(message, context)


@client_app.query("fit")
def hostile_fit(message, context):
    reply = inner(message, context)
    case = CASES.get(message.metadata.group_id, [""])[0] if client_id_of(context) == "c3" else ""
    if case == "rich_markup_error":
        return FlMessage(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="[/red] boom [bold]x"),
                         reply_to=message)
    if case not in ("nested_meta_bomb", "qint8_dtype_record", "wrong_version"):
        return reply
    header = dict(reply.content["fedkt.header"])
    if case == "nested_meta_bomb":
        header["meta"] = "[" * 200000 + "]" * 200000
    elif case == "qint8_dtype_record":
        dtypes = json.loads(header["dtypes"])
        dtypes["lora_B"] = "qint8"
        tensors = reply.content["fedkt.tensors"]
        from flwr.app import Array
        import numpy as np
        tensors["lora_B"] = Array(np.zeros((4, 2), dtype=np.uint8))
        header["dtypes"] = json.dumps(dtypes)
    elif case == "wrong_version":
        header["version"] = 2
    return FlMessage(RecordDict({"fedkt.tensors": reply.content["fedkt.tensors"],
                                 "fedkt.header": ConfigRecord(header)}), reply_to=message)


server_app = ServerApp()


@server_app.main()
def main(grid, context):
    from fedkt.algorithms.fedavg import fit_round
    from fedkt.federation.flower import FlowerFederation

    cfg = context.run_config
    fed = FlowerFederation(grid, clients=["c0", "c1", "c2", "c3"], on_failure="skip", timeout=120.0)
    state = {"lora_A": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 12, "lora_B": torch.zeros(4, 2)}
    out = {}
    for rnd in range(1, %(rounds)d + 1):
        state = fit_round(fed, state, rnd, 1.0)
        out[f"{rnd}.lora_A"], out[f"{rnd}.lora_B"] = state["lora_A"], state["lora_B"]
    open(cfg["out"], "wb").write(codec.encode(Message(tensors=out, meta={"failures": fed.failures})))
'''

PYPROJECT = '''
[project]
name = "fedkt-hostile"
version = "0.1.0"
description = "fedkt hostile-client Flower app (test)"
dependencies = []

[tool.flwr.app]
publisher = "fedkt"

[tool.flwr.app.components]
serverapp = "fedkt_hostile_app:server_app"
clientapp = "fedkt_hostile_app:client_app"

[tool.flwr.app.config]
out = ""
'''


@pytest.mark.slow
def test_real_deployment_survives_hostile_replies(tmp_path):
    import re

    t_start = time.perf_counter()
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    rounds = max(CASES)
    (app / "fedkt_hostile_app.py").write_text(APP % {"cases": {str(k): v for k, v in CASES.items()},
                                                     "rounds": rounds})
    out = tmp_path / "out.bin"
    with LocalFlowerDeployment(tmp_path / "deploy", ["c0", "c1", "c2", "c3"]) as dep:
        run_id = dep.run_app(app, {"out": str(out)})
        status = dep.wait_run(run_id, timeout=540)
        logs = (tmp_path / "deploy" / "superlink.log").read_text()
        run_log = dep.run_log(run_id)
    (tmp_path / "run.log").write_text(run_log)
    assert status == "finished:completed", (logs[-2000:], run_log[-8000:])
    res = codec.decode(out.read_bytes())
    failures = res.meta["failures"]
    assert [(f["round"], f["client"]) for f in failures] == [(r, "c3") for r in sorted(CASES)], failures
    for f in failures:
        name, pattern = CASES[f["round"]]
        assert re.search(pattern, f["error"]), (name, f["error"][:300])
    # the hostile client is named in the server's log, markup shown literally
    flat = " ".join(run_log.split())  # Rich wraps long lines
    assert "client c3 failed in 'fit' (round 3)" in flat and "[/red] boom [bold]x" in flat
    # each round's aggregate is the honest clients' weighted mean, by hand (round 1: all four honest)
    A = torch.arange(12, dtype=torch.float64).reshape(3, 4) / 12
    B = torch.zeros(4, 2, dtype=torch.float64)
    A, B = A + 0.1 * 300 / 100, B - 0.05 * 200 / 100  # weights 10..40: Σ w(i+1) = 300, Σ w·i = 200
    assert torch.allclose(res.tensors["1.lora_A"].double(), A, atol=1e-6)
    assert torch.allclose(res.tensors["1.lora_B"].double(), B, atol=1e-6)
    for rnd in range(2, rounds + 1):
        A, B = A + 0.1 * 140 / 60, B - 0.05 * 80 / 60
        assert torch.allclose(res.tensors[f"{rnd}.lora_A"].double(), A, atol=1e-5), rnd
        assert torch.allclose(res.tensors[f"{rnd}.lora_B"].double(), B, atol=1e-5), rnd
    print(f"hostile deployment: {rounds} rounds, test wall time {time.perf_counter() - t_start:.1f} s")
    json.dumps(failures)  # the failures record is plain JSON (results.json carries it)
