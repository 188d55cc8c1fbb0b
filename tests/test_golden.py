"""Golden runs: a 2-round tiny FedAvg and FedCoLLM experiment must reproduce, to 1e-6, the adapters,
client losses, distillation losses, accuracies and bytes recorded before the architecture refactor.
If one of these fails, behaviour changed: find out why; never re-record to make it pass."""

import json

import pytest
import torch

from golden_helpers import GOLDEN_DIR, make_golden_assets, run_golden


@pytest.fixture(scope="module")
def golden_assets(tmp_path_factory):
    return make_golden_assets(tmp_path_factory.mktemp("golden"))


def assert_close(got, want, path="", tol=1e-6):
    if isinstance(want, dict):
        assert set(got) == set(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_close(got[k], want[k], f"{path}.{k}", tol)
    elif isinstance(want, list):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{path}[{i}]", tol)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=tol, abs=tol), path
    else:
        assert got == want, path


@pytest.mark.parametrize("method", ["fedavg", "fedcollm"])
def test_golden_run(tmp_path, golden_assets, method):
    dirs, data = golden_assets
    want = json.loads((GOLDEN_DIR / f"{method}.json").read_text())
    got = run_golden(tmp_path, dirs, data, method)
    assert_close(got, want, method)
    assert len(got["client_losses"]) == 6  # 3 clients x 2 rounds


def test_next_round_broadcasts_exactly_the_distilled_slm_adapter(tmp_path, golden_assets, monkeypatch):
    """Round r+1's "fit" payload is θ after round r's distillation (not the pre-distillation FedAvg)."""
    from safetensors.torch import load_file

    from fedkt.federation import codec
    from golden_helpers import golden_config
    from fedkt.runs import run_experiment

    sent = []
    orig = codec.encode

    def recording(msg):
        if msg.meta.get("round") == 2 and msg.tensors and "epochs" in msg.meta:
            sent.append({k: v.clone() for k, v in msg.tensors.items()})
        return orig(msg)

    monkeypatch.setattr(codec, "encode", recording)
    dirs, data = golden_assets
    run_experiment(golden_config(dirs, data, ["fedcollm"]), tmp_path / "r")
    distilled = load_file(str(tmp_path / "r" / "checkpoints" / "fedcollm" / "round_001" / "slm.safetensors"))
    assert len(sent) == 3  # one per client
    for payload in sent:
        assert payload.keys() == distilled.keys()
        assert all(torch.equal(payload[k], distilled[k]) for k in distilled)
