"""SecAgg+ as strong as docs/secagg.md claims (issue 20, item 6): the mask PRG, CSPRNG rounding, the
3-client minimum, no re-aggregation of a round, the reported error bound, hostile masked replies."""

import numpy as np
import pytest
import torch

from fedkt.config import ConfigError
from fedkt.registry import load_config
from fedkt.federation import AllClientsFailed, Message, weighted_mean
from test_aggregate_local import HANDLERS, _local, _payloads  # noqa: F401

flwr = pytest.importorskip("flwr")

from fedkt.federation import secagg_crypto  # noqa: E402
from fedkt.federation.flower import FlowerFederation  # noqa: E402
from fedkt.federation.flower_secagg import SecAggSettings, error_bound  # noqa: E402
from fedkt.federation.secagg_guard import ReaggregationRefused  # noqa: E402


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("sets,msg", [
    (["federation.secagg_min_clients=2"], r"secagg_min_clients = 2: secure aggregation needs at least 3 clients"),
    (["federation.secure_aggregation=true", "partition.num_clients=2"],
     r"secure_aggregation with partition.num_clients = 2: .*at least federation.secagg_min_clients = 3"),
    (["federation.secagg_modulus_range=3000000000"], r"secagg_modulus_range = 3000000000 must be a power of two"),
    (["federation.secagg_quantization_range=4294967296"], r"must be <= 2\^30"),
    (["federation.secagg_clipping_range=0"], r"secagg_clipping_range must be > 0")])
def test_secagg_settings_are_validated(tmp_path, sets, msg):
    p = tmp_path / "c.toml"
    p.write_text('methods = ["fedavg"]\n[data]\ntasks = ["arc_easy"]\n')
    with pytest.raises(ConfigError, match=msg):
        load_config(p, sets)


def test_secagg_settings_come_from_the_federation_section(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('methods = ["fedavg"]\n[data]\ntasks = ["arc_easy"]\n[federation]\nsecagg_clipping_range = 2.0\n'
                 'secagg_quantization_range = 1048576\nsecagg_modulus_range = 4294967296\nsecagg_max_weight = 50.0\n')
    s = SecAggSettings.from_config(load_config(p, []).federation)
    assert (s.min_clients, s.clipping_range, s.quantization_range, s.modulus_range, s.max_weight) == \
        (3, 2.0, 2**20, 2**32, 50.0)


# ----------------------------------------------------------------------------------------- the mask PRG
def test_flwr_masks_have_32_bit_seeds_fedkt_masks_use_the_whole_key():
    """flwr XOR-folds a 32-byte key into 32 bits: two keys with the same fold give the same mask (2^32 masks
    in all). fedkt's AES-CTR expansion depends on every bit of the key."""
    k1 = bytes(range(32))
    k2 = bytes(a ^ b for a, b in zip(k1, b"\x5a\xa5\x0f\xf0" * 2 + bytes(24)))  # words 0 and 1 flipped alike
    dims = [(4, 5), (1,)]
    flwr_1, flwr_2 = secagg_crypto.flwr_pseudo_rand_gen(k1, 2**32, dims), secagg_crypto.flwr_pseudo_rand_gen(k2, 2**32, dims)
    assert all(np.array_equal(a, b) for a, b in zip(flwr_1, flwr_2))  # the weakness, shown
    ours_1, ours_2 = secagg_crypto.mask_prg(k1, 2**32, dims), secagg_crypto.mask_prg(k2, 2**32, dims)
    assert not np.array_equal(ours_1[0], ours_2[0])
    again = secagg_crypto.mask_prg(k1, 2**32, dims)  # deterministic: client and server expand alike
    assert all(np.array_equal(a, b) and a.dtype == np.int64 for a, b in zip(ours_1, again))
    big = secagg_crypto.mask_prg(b"\x01" * 32, 2**8, [(200_000,)])[0]
    assert big.min() == 0 and big.max() == 255  # the full range (flwr never draws num_range - 1)
    assert abs(big.mean() - 127.5) < 1.0 and np.bincount(big, minlength=256).min() > 600


def test_both_sides_run_the_patched_prg_and_a_node_without_it_refuses(monkeypatch):
    assert secagg_crypto.installed()
    fed = FlowerFederation.in_process([f"c{i}" for i in range(3)], HANDLERS, on_failure="skip",
                                      secagg=SecAggSettings(reconstruction_threshold=2))
    try:
        monkeypatch.setattr(secagg_crypto, "installed", lambda: False)  # the nodes run in this process
        with pytest.raises(AllClientsFailed, match=r"asks for mask PRG 'aes256ctr-sha256-v1'; this node runs"):
            fed.aggregate("fit", _payloads(fed.clients), round=1)
    finally:
        fed.close()


# ------------------------------------------------------------------------------------------- rounding
def test_rounding_is_fresh_csprng_randomness_not_derivable_from_a_seed():
    from flwr.common.secure_aggregation.quantization import quantize

    x = [np.linspace(-1, 1, 4000)]
    np.random.seed(1234)  # what fedkt did before: a public per-round seed
    a = quantize(x, 8.0, 2**10)[0]
    np.random.seed(1234)
    b = quantize(x, 8.0, 2**10)[0]
    assert not np.array_equal(a, b)  # the same public seed no longer reproduces the rounding
    # still unbiased stochastic rounding: the mean over many draws is the exact value
    v = np.full(20000, 0.3)
    assert abs(secagg_crypto.stochastic_round(v).mean() - 0.3) < 0.02
    assert set(np.unique(secagg_crypto.stochastic_round(v))) == {0, 1}


# --------------------------------------------------------------------------- journal, bound, hostile replies
@pytest.fixture
def fed4(tmp_path):
    fed = FlowerFederation.in_process([f"c{i}" for i in range(4)], HANDLERS, on_failure="skip",
                                      secagg=SecAggSettings(reconstruction_threshold=2),
                                      secagg_journal=tmp_path / "journal")
    yield fed
    fed.close()


def _expect(clients):
    replies = _local(4).call("fit", _payloads(clients))
    return weighted_mean([r.tensors for r in replies.values()], [r.meta["num_examples"] for r in replies.values()])


def test_a_round_is_never_securely_aggregated_twice(fed4, tmp_path):
    clients = ["c0", "c1", "c2"]
    first = fed4.aggregate("fit", _payloads(clients), round=5)
    pushed = []
    push = fed4.grid.push_messages
    fed4.grid.push_messages = lambda msgs: pushed.extend(msgs) or push(msgs)
    try:
        # the same round again (a resumed run): the recorded mean, no protocol run, no client trains again
        again = fed4.aggregate("fit", _payloads(clients), round=5)
        assert pushed == [] and again.clients == clients
        assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
        # the same round over another client set: refused, nothing sent
        with pytest.raises(ReaggregationRefused, match=r"round 5 of 'fit' was already securely aggregated over "
                                                       r"\['c0', 'c1', 'c2'\]"):
            fed4.aggregate("fit", _payloads(["c0", "c1", "c2", "c3"]), round=5)
        assert pushed == []
    finally:
        fed4.grid.push_messages = push
    # the journal is on disk: a restarted server (new federation) refuses too, and replays the same mean
    fed = FlowerFederation.in_process([f"c{i}" for i in range(4)], HANDLERS, on_failure="skip",
                                      secagg=SecAggSettings(reconstruction_threshold=2),
                                      secagg_journal=tmp_path / "journal")
    try:
        with pytest.raises(ReaggregationRefused):
            fed.aggregate("fit", _payloads(["c1", "c2", "c3"]), round=5)
        replay = fed.aggregate("fit", _payloads(clients), round=5)
        assert all(torch.equal(first.tensors[k], replay.tensors[k]) for k in first.tensors)
    finally:
        fed.close()


def test_induced_error_is_reported_per_round_and_holds(fed4):
    clients = ["c0", "c1", "c2"]
    agg = fed4.aggregate("fit", _payloads(clients), round=6)
    notes = fed4.take_notes()
    bound = error_bound([10, 20, 30], fed4.secagg)
    assert notes["secagg"]["fit"]["error_bound"] == pytest.approx(bound) and notes["secagg"]["fit"]["clients"] == 3
    assert notes["secagg"]["fit"]["clipped"] == {}
    err = max((agg.tensors[k].double() - v.double()).abs().max().item() for k, v in _expect(clients).items())
    assert 0 < err <= bound, (err, bound)
    assert fed4.take_notes() == {}  # taken once per round


def test_hostile_clear_parts_drop_that_node_and_the_mean_is_the_others(fed4):
    """c3's masked reply carries a meta key the 'fit' schema does not allow (a fedkt client never sends it):
    the server withholds it from the sum, SecAgg+ removes c3's masks, the mean is c0..c2's."""
    handler = HANDLERS["fit"]

    def fit(ctx, msg):
        r = handler(ctx, msg)
        return Message(tensors=r.tensors, meta={**r.meta, "client_id": "c0"}) if ctx.cid == "c3" else r

    HANDLERS["fit"] = fit
    try:
        agg = fed4.aggregate("fit", _payloads(["c0", "c1", "c2", "c3"]), round=7)
    finally:
        HANDLERS["fit"] = handler
    assert agg.clients == ["c0", "c1", "c2"]
    assert fed4.failures[-1]["client"] == "c3" and "unexpected meta key 'client_id'" in fed4.failures[-1]["error"]
    bound = error_bound([10, 20, 30], fed4.secagg)
    for k, v in _expect(["c0", "c1", "c2"]).items():
        assert (agg.tensors[k] - v).abs().max().item() <= bound


def test_a_reply_of_another_layout_is_dropped_before_the_sum(fed4):
    """With the adapter the server expects (``expect``), a masked reply declaring another shape is withheld."""
    handler = HANDLERS["fit"]

    def fit(ctx, msg):
        r = handler(ctx, msg)
        if ctx.cid == "c1":
            return Message(tensors={**r.tensors, "lora_B": torch.zeros(2, 6)}, meta=r.meta)
        return r

    HANDLERS["fit"] = fit
    try:
        expect = {"lora_A": torch.zeros(4, 6), "lora_B": torch.zeros(6, 2)}
        agg = fed4.aggregate("fit", _payloads(["c0", "c1", "c2", "c3"]), round=8, expect=expect)
    finally:
        HANDLERS["fit"] = handler
    assert agg.clients == ["c0", "c2", "c3"]
    assert "tensor 'lora_B' is torch.float32[2, 6], expected torch.float32[6, 2]" in fed4.failures[-1]["error"]
    bound = error_bound([10, 30, 40], fed4.secagg)
    for k, v in _expect(["c0", "c2", "c3"]).items():
        assert (agg.tensors[k] - v).abs().max().item() <= bound
