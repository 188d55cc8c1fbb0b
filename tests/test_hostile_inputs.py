"""The hostile-input suite (issue 20, docs/hostile-inputs.md): one client of four replies something hostile in
round 2 of a FedAvg run (``fit_round``, the real server path) under ``on_client_failure = "skip"``. For every
case: the server keeps running, round 2 completes with the three honest clients, the hostile client is named in
``failures`` and in the log, and the aggregate equals the honest clients' hand-computed weighted mean.

Replies travel through ``LocalFederation``'s wire (codec encode -> decode): a case either returns a
:class:`~fedkt.federation.base.Message` (the hostile client's handler) or raw bytes (:class:`Raw`, a hostile
client that writes the wire itself). Flower-level cases (records, identify replies, slow clients) are at the
end; real SuperLink + SuperNodes: tests/test_hostile_processes.py.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import pytest
import torch

from fedkt.algorithms.fedavg import fit_round
from fedkt.clients import ClientContext
from fedkt.federation import AllClientsFailed, ClientFailure, Message, codec, local
from fedkt import message
from fedkt.federation import validate
from fedkt.federation.local import LocalFederation

EVIL = "c3"
HONEST = {"c0": 10, "c1": 20, "c2": 30}
STATE = {"lora_A": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 12, "lora_B": torch.zeros(4, 2)}


def honest_reply(cid: str, sent: dict[str, torch.Tensor]) -> Message:
    """Client i adds 0.1·(i+1) to A and subtracts 0.05·i from B; weight 10·(i+1)."""
    i = int(cid[1:])
    return Message(tensors={"lora_A": sent["lora_A"] + 0.1 * (i + 1), "lora_B": sent["lora_B"] - 0.05 * i},
                   meta={"num_examples": 10 * (i + 1), "loss": 1.0 + i, "steps": 3})


def expected_round2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Σ wᵢ θᵢ / Σ wᵢ over c0..c2 by hand: A + 0.1·(10·1 + 20·2 + 30·3)/60, B − 0.05·(20·1 + 30·2)/60."""
    return {"lora_A": (state["lora_A"].double() + 0.1 * 140 / 60).float(),
            "lora_B": (state["lora_B"].double() - 0.05 * 80 / 60).float()}


@dataclass
class Raw(Message):
    """A reply whose wire bytes the hostile client writes itself."""

    raw: bytes = b""


class _Wire:
    """Stands in for the codec module inside LocalFederation: a Raw reply goes on the wire as its bytes."""

    def encode(self, msg):
        return msg.raw if isinstance(msg, Raw) else codec.encode(msg)

    def decode(self, data):
        return codec.decode(data)


def _enc(msg: Message) -> bytes:
    return codec.encode(msg)


def _with_header(header: bytes, blob: bytes = b"") -> bytes:
    return codec.MAGIC + struct.pack("<Q", len(header)) + header + blob


def _st(header: dict | bytes, data: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def _honest_header(h: Message) -> bytes:
    return json.dumps({"texts": h.texts, "meta": h.meta}).encode()


class _BadRepr(Exception):
    def __repr__(self):
        raise RuntimeError("repr bomb")

    def __str__(self):
        raise RuntimeError("str bomb")


def _nested(depth: int):
    v: object = 1
    for _ in range(depth):
        v = [v]
    return v


def _meta(h: Message, **kw) -> Message:
    return Message(tensors=h.tensors, texts=h.texts, meta={**h.meta, **kw})


def _raise(e: BaseException):
    raise e


# Each case: (id, hostile(h, sent, ctx) -> reply, regex the failure text must match). ``h`` is what an honest
# client c3 would reply (weight 40), ``sent`` the adapter the server sent, ``ctx`` the hostile client's context.
CASES = [
    # ---- the rows of the issue
    ("nested_meta_json", lambda h, s, c: _meta(h, deep=_nested(500)), r"nested deeper than 64"),
    ("nested_meta_raw_100k", lambda h, s, c: Raw(raw=_with_header(b'{"texts":[],"meta":' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
     r"nested deeper than 64"),
    ("rich_markup_error", lambda h, s, c: _raise(RuntimeError("[/red] boom [bold]x[/bold] [link=file:///etc]")),
     r"\[/red\] boom"),
    ("qint8_tensor", lambda h, s, c: Message(tensors={**h.tensors, "lora_A": torch.quantize_per_tensor(
        h.tensors["lora_A"], 0.1, 0, torch.qint8)}, meta=h.meta), r"qint8|QInt8|quantized|Quantized"),
    ("missing_num_examples", lambda h, s, c: Message(tensors=h.tensors, meta={"loss": 1.0}), r"meta lacks 'num_examples'"),
    ("side_channel_key", lambda h, s, c: _meta(h, changed_fraction=0.0), r"unexpected meta key 'changed_fraction'"),
    ("num_examples_str", lambda h, s, c: _meta(h, num_examples="40"), r"meta\['num_examples'\] = '40' is not an integer > 0"),
    ("loss_str", lambda h, s, c: _meta(h, loss="low"), r"meta\['loss'\] = 'low' is not a number"),
    ("loss_dict", lambda h, s, c: _meta(h, loss={"a": 1}), r"meta\['loss'\]"),
    ("steps_negative", lambda h, s, c: _meta(h, steps=-1), r"meta\['steps'\] = -1"),
    ("unexpected_meta_key", lambda h, s, c: _meta(h, client_id="c0"), r"unexpected meta key 'client_id'"),
    ("meta_not_object", lambda h, s, c: Raw(raw=_with_header(b'{"texts":[],"meta":[1,2]}')), r"object 'meta'"),
    ("header_not_object", lambda h, s, c: Raw(raw=_with_header(b'[1]')), r"must be a JSON object"),
    ("other_shape", lambda h, s, c: Message(tensors={**h.tensors, "lora_A": torch.zeros(4, 3)}, meta=h.meta),
     r"tensor 'lora_A' is torch.float32\[4, 3\], expected torch.float32\[3, 4\]"),
    ("nan_values", lambda h, s, c: Message(tensors={**h.tensors, "lora_B": h.tensors["lora_B"] * float("nan")}, meta=h.meta),
     r"'lora_B' holds NaN or infinite"),
    ("inf_values", lambda h, s, c: Message(tensors={**h.tensors, "lora_A": h.tensors["lora_A"] + float("inf")}, meta=h.meta),
     r"'lora_A' holds NaN or infinite"),
    ("weight_negative", lambda h, s, c: _meta(h, num_examples=-40), r"num_examples'\] = -40"),
    ("weight_nan", lambda h, s, c: _meta(h, num_examples=float("nan")), r"num_examples'\] = nan"),
    ("weight_1e300", lambda h, s, c: _meta(h, num_examples=1e300), r"num_examples'\] = 1e\+300"),
    ("weight_true", lambda h, s, c: _meta(h, num_examples=True), r"num_examples'\] = True"),
    ("weight_zero", lambda h, s, c: _meta(h, num_examples=0), r"num_examples'\] = 0 "),
    ("weight_huge_int", lambda h, s, c: _meta(h, num_examples=10**400), r"num_examples'\] = 1000"),
    ("weight_float", lambda h, s, c: _meta(h, num_examples=40.5), r"num_examples'\] = 40.5"),
    ("weight_above_declared", lambda h, s, c: _meta(h, num_examples=41), r"more than the 40 examples it declared"),
    # ---- what else a hostile client can send
    ("truncated_safetensors", lambda h, s, c: Raw(raw=_enc(h)[:-9]), r"not valid safetensors"),
    ("duplicated_tensor_names", lambda h, s, c: Raw(raw=_with_header(_honest_header(h), _st(
        b'{"lora_A":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]},'
        b'"lora_A":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]},'
        b'"lora_B":{"dtype":"F32","shape":[4,2],"data_offsets":[48,80]}}', bytes(80)))), r"names the key 'lora_A' twice"),
    ("huge_declared_shape", lambda h, s, c: Raw(raw=_with_header(_honest_header(h), _st(
        {"lora_A": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 48]}}, bytes(48)))), r"not valid safetensors"),
    ("safetensors_header_length_past_end", lambda h, s, c: Raw(raw=_with_header(_honest_header(h),
                                                                               struct.pack("<Q", 2**62) + b"{}")),
     r"header length 4611686018427387904 exceeds"),
    ("header_length_past_end", lambda h, s, c: Raw(raw=codec.MAGIC + struct.pack("<Q", 2**63) + b"{}"),
     r"header length 9223372036854775808 exceeds"),
    ("wrong_version_magic", lambda h, s, c: Raw(raw=b"FKT2" + _enc(h)[4:]), r"bad magic"),
    ("empty_bytes", lambda h, s, c: Raw(raw=b""), r"bad magic"),
    ("non_utf8_header", lambda h, s, c: Raw(raw=_with_header(b'{"texts":["\xff\xfe"],"meta":{}}')), r"not UTF-8"),
    ("lone_surrogate_text", lambda h, s, c: Message(tensors=h.tensors, texts=["ok", "\udcff"], meta=h.meta),
     r"text 1 is not valid Unicode"),
    ("texts_on_fit", lambda h, s, c: Message(tensors=h.tensors, texts=["hello"], meta=h.meta), r"1 texts; this handler replies none"),
    ("oversized_text_list", lambda h, s, c: Message(tensors=h.tensors, texts=[""] * 1001, meta=h.meta), r"1001 texts, the limit is 1000"),
    ("oversized_text", lambda h, s, c: Message(tensors=h.tensors, texts=["x" * 5001], meta=h.meta), r"5001 characters"),
    ("oversized_meta", lambda h, s, c: _meta(h, loss="x" * (9 * 2**20)), r"bytes of JSON, the limit is 8388608"),
    ("extra_tensor", lambda h, s, c: Message(tensors={**h.tensors, "backdoor": torch.zeros(2)}, meta=h.meta),
     r"unexpected \['backdoor'\]"),
    ("missing_tensor", lambda h, s, c: Message(tensors={"lora_A": h.tensors["lora_A"]}, meta=h.meta), r"missing \['lora_B'\]"),
    ("float64_tensor", lambda h, s, c: Message(tensors={**h.tensors, "lora_A": h.tensors["lora_A"].double()}, meta=h.meta),
     r"'lora_A' is torch.float64\[3, 4\], expected torch.float32"),
    ("float16_tensor", lambda h, s, c: Message(tensors={**h.tensors, "lora_A": h.tensors["lora_A"].half()}, meta=h.meta),
     r"'lora_A' is torch.float16"),
    ("int_tensor", lambda h, s, c: Message(tensors={**h.tensors, "lora_A": torch.ones(3, 4, dtype=torch.int64)}, meta=h.meta),
     r"'lora_A' has dtype torch.int64"),
    ("bool_tensor", lambda h, s, c: Message(tensors={**h.tensors, "lora_B": torch.ones(4, 2, dtype=torch.bool)}, meta=h.meta),
     r"'lora_B' has dtype torch.bool"),
    ("no_tensors", lambda h, s, c: Message(meta=h.meta), r"missing \['lora_A', 'lora_B'\]"),
    ("replayed_round1_reply", lambda h, s, c: c.state["round1"], r"bit-identical to its reply in round 1"),
    ("not_a_message", lambda h, s, c: {"tensors": h.tensors}, r"AttributeError|dict"),
    ("returns_none", lambda h, s, c: None, r"AttributeError|NoneType"),
    ("recursion_error", lambda h, s, c: _raise(RecursionError("maximum recursion depth exceeded")), r"RecursionError"),
    ("exception_with_bad_repr", lambda h, s, c: _raise(_BadRepr()), r"_BadRepr\(<unprintable>\)"),
    ("huge_error_text", lambda h, s, c: _raise(RuntimeError("E" * 300_000)), r"\.\.\. \(\d+ characters\)"),
]


def _hostile_handler(case):
    _, make, _ = case

    def fit(ctx: ClientContext, msg: Message):
        h = honest_reply(ctx.cid, msg.tensors)
        if ctx.cid != EVIL or msg.meta["round"] == 1:
            if ctx.cid == EVIL:
                ctx.state["round1"] = h
            return h
        return make(h, msg.tensors, ctx)
    return fit


@pytest.fixture
def wire(monkeypatch):
    monkeypatch.setattr(local, "codec", _Wire())
    monkeypatch.setattr(validate, "MAX_TEXTS", 1000)
    monkeypatch.setattr(validate, "MAX_TEXT_CHARS", 5000)


def test_the_suite_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "aggregate"])
def test_hostile_reply_is_that_clients_failure_and_the_round_completes(case, secure, wire, capsys):
    fed = LocalFederation([ClientContext(f"c{i}") for i in range(4)], {"fit": _hostile_handler(case)},
                          on_failure="skip")
    theta1 = fit_round(fed, STATE, 1, 1.0, secure=secure)  # round 1: everyone honest (c3 declares 40 examples)
    assert fed.failures == [] and fed.declared_examples == {"c0": 10, "c1": 20, "c2": 30, "c3": 40}
    theta2 = fit_round(fed, theta1, 2, 1.0, secure=secure)
    # the hostile client is named, once, with the reason; the honest ones are not
    assert [f["client"] for f in fed.failures] == [EVIL], fed.failures
    assert fed.failures[0]["round"] == 2 and fed.failures[0]["method"] == "fit"
    import re

    assert re.search(case[2], fed.failures[0]["error"]), (fed.failures[0]["error"][:300], case[2])
    err = capsys.readouterr().err
    assert f"client {EVIL} failed in 'fit' (round 2)" in err.replace("\n", " ") or f"client {EVIL} failed" in err
    if case[0] == "rich_markup_error":
        assert "[/red] boom [bold]x[/bold]" in err  # shown literally, not interpreted (and no MarkupError)
    # the result is the honest clients' weighted mean, computed by hand
    want = expected_round2(theta1)
    for k in want:
        assert theta2[k].dtype == torch.float32 and torch.allclose(theta2[k], want[k], atol=1e-6), k
    # the federation still works: round 3 with every client honest again is not refused for c3
    fed._handlers["fit"] = lambda ctx, msg: honest_reply(ctx.cid, msg.tensors)
    fit_round(fed, theta2, 3, 1.0, secure=secure)
    assert len(fed.failures) == 1


def test_under_stop_a_hostile_reply_stops_the_run_with_a_clear_error(wire):
    case = next(c for c in CASES if c[0] == "weight_1e300")
    fed = LocalFederation([ClientContext(f"c{i}") for i in range(4)], {"fit": _hostile_handler(case)})
    theta1 = fit_round(fed, STATE, 1, 1.0)
    with pytest.raises(ClientFailure, match=r"client c3 failed in 'fit': ReplyError: client c3 reply to 'fit': "
                                            r"meta\['num_examples'\] = 1e\+300 is not an integer > 0"):
        fit_round(fed, theta1, 2, 1.0)


def test_min_clients_still_applies_when_hostile_replies_are_dropped(wire):
    case = next(c for c in CASES if c[0] == "nan_values")
    fed = LocalFederation([ClientContext(f"c{i}") for i in range(4)], {"fit": _hostile_handler(case)},
                          on_failure="skip", min_clients=4)
    theta1 = fit_round(fed, STATE, 1, 1.0)
    with pytest.raises(AllClientsFailed, match=r"only 3 of 4 clients replied in 'fit' \(round 2\)"):
        fit_round(fed, theta1, 2, 1.0)


# -------------------------------------------------------------------------------- the mean itself refuses
@pytest.mark.parametrize("weights,msg", [
    ([1, -1], "weights must sum to > 0"), ([1, float("nan")], "weights must sum to > 0"), ([1, 1e300], "finite numbers"),
    ([1, True], "not bools"), ([2, 0], "finite numbers"), ([1, float("inf")], "finite numbers")])
def test_weighted_mean_and_fedavg_aggregate_refuse_bad_weights(weights, msg):
    from fedkt.algorithms.fedavg import aggregate
    from fedkt.federation import weighted_mean

    states = [{"a": torch.ones(2)}, {"a": torch.zeros(2)}]
    for fn in (weighted_mean, aggregate):
        with pytest.raises(ValueError, match=msg):
            fn(states, weights)


@pytest.mark.parametrize("bad,msg", [
    ({"a": torch.ones(3)}, r"shape \[2\]"), ({"a": torch.tensor([1.0, float("nan")])}, "NaN or infinite"),
    ({"a": torch.ones(2, dtype=torch.int64)}, "float tensor"), ({"b": torch.ones(2)}, "different keys")])
def test_weighted_mean_and_fedavg_aggregate_refuse_bad_states(bad, msg):
    from fedkt.algorithms.fedavg import aggregate
    from fedkt.federation import weighted_mean

    for fn in (weighted_mean, aggregate):
        with pytest.raises(ValueError, match=msg):
            fn([{"a": torch.ones(2)}, bad], [1, 1])


def test_json_scan_never_recurses():
    bomb = "[" * 1_000_000 + "]" * 1_000_000
    with pytest.raises(validate.ReplyError, match="nested deeper than 64"):
        message.loads(bomb, "x")
    # brackets inside strings do not count; escaped quotes do not end a string
    assert message.loads(json.dumps({"a": "[[[[" * 100 + '\\"]]' + "{" * 100}), "x")["a"].startswith("[[[[")
    with pytest.raises(validate.ReplyError, match="names the key 'a' twice"):
        message.loads('{"a": 1, "a": 2}', "x")


# ------------------------------------------------------------------------ hostile server: absurd requests
@pytest.mark.parametrize("meta,msg", [
    ({"round": 2, "epochs": 1e12}, r"epochs = 1000000000000.0; this client trains a finite number of epochs"),
    ({"round": 2, "epochs": float("nan")}, r"epochs = nan"),
    ({"round": -1, "epochs": 1}, r"round = -1"),
    ({"round": "2", "epochs": 1}, r"round = '2'")])
def test_client_refuses_absurd_requests_cleanly(meta, msg):
    ran = []
    fed = LocalFederation([ClientContext("c0"), ClientContext("c1")],
                          {"fit": lambda ctx, m: ran.append(ctx.cid) or honest_reply(ctx.cid, m.tensors)},
                          on_failure="skip")
    with pytest.raises(AllClientsFailed, match=msg):
        fed.call("fit", {c: Message(tensors=STATE, meta=meta) for c in fed.clients}, round=2)
    assert ran == []  # the handler never ran
    nan_state = {**STATE, "lora_B": torch.full((4, 2), float("nan"))}
    with pytest.raises(AllClientsFailed, match="adapter tensor 'lora_B' is not a finite float tensor"):
        fed.call("fit", {c: Message(tensors=nan_state, meta={"round": 1}) for c in fed.clients}, round=1)


def test_client_app_refuses_unknown_handler_and_malformed_payload():
    """Through Flower's in-process engine: a node asked for a handler it does not serve, sent a record that is
    not a fedkt message (a nested bomb), or an absurd request, answers with an error reply; its process and
    the server go on (the same node then answers a sane request)."""
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, RecordDict
    from flwr.app import Message as FlMessage

    from fedkt.federation import flower_codec
    from fedkt.federation.flower import FlowerFederation
    from fedkt.federation.flower_protocol import error_of

    fed = FlowerFederation.in_process(["c0", "c1"], {"fit": lambda ctx, m: honest_reply(ctx.cid, m.tensors)},
                                      on_failure="skip", timeout=30)
    try:
        def ask(message_type, content):
            msg = FlMessage(content, dst_node_id=fed._nodes["c0"], message_type=message_type, group_id="1")
            (r,) = fed._exchange([msg], 30)
            return r

        r = ask("query.nope", flower_codec.encode(Message()))
        assert r is not None and r.has_error()
        r = ask("query.fit", RecordDict({"fedkt.tensors": flower_codec.encode(Message())["fedkt.tensors"],
                                          "fedkt.header": ConfigRecord({
                                              "version": 1, "texts": "[]", "meta": "[" * 5000 + "]" * 5000,
                                              "dtypes": "{}"})}))
        assert r.has_error() and "nested deeper than 64" in str(error_of(r))
        r = ask("query.fit", flower_codec.encode(Message(tensors=STATE, meta={"round": 1, "epochs": 1e9})))
        assert r.has_error() and "epochs = 1000000000.0" in str(error_of(r))
        got = fed.call("fit", {"c0": Message(tensors=STATE, meta={"round": 1, "epochs": 1})}, round=1)
        assert torch.allclose(got["c0"].tensors["lora_A"], STATE["lora_A"] + 0.1)
    finally:
        fed.close()


# ------------------------------------------------------------- Flower records a hostile node writes itself
def _tamper(case, rd):
    import numpy as np
    from flwr.app import Array, ConfigRecord, RecordDict

    header = dict(rd["fedkt.header"])
    tensors = rd["fedkt.tensors"]
    if case == "nested_meta_bomb":
        header["meta"] = "[" * 200_000 + "]" * 200_000
    elif case == "qint8_dtype":
        dtypes = json.loads(header["dtypes"])
        dtypes["lora_B"] = "qint8"
        tensors["lora_B"] = Array(np.zeros((4, 2), dtype=np.uint8))
        header["dtypes"] = json.dumps(dtypes)
    elif case == "wrong_version":
        header["version"] = 2
    elif case == "dtypes_mismatch":
        header["dtypes"] = json.dumps({"lora_A": "float32"})
    elif case == "meta_not_json":
        header["meta"] = "{'num_examples': 40"
    elif case == "meta_wrong_type":
        header["meta"] = 42
    elif case == "duplicate_meta_key":
        header["meta"] = header["meta"][:-1] + ',"num_examples":4000}'
    elif case == "stray_record":
        return RecordDict({"fedkt.tensors": tensors, "fedkt.header": ConfigRecord(header), "x": ConfigRecord({})})
    return RecordDict({"fedkt.tensors": tensors, "fedkt.header": ConfigRecord(header)})


FLOWER_CASES = [
    ("nested_meta_bomb", r"nested deeper than 64"), ("qint8_dtype", r"quantized dtype 'qint8'"),
    ("wrong_version", r"header version 2"), ("dtypes_mismatch", r"dtypes name tensors \['lora_A'\]"),
    ("meta_not_json", r"\['meta'\] is not valid JSON"), ("meta_wrong_type", r"\['meta'\] must be a JSON string"),
    ("duplicate_meta_key", r"names the key 'num_examples' twice"), ("stray_record", r"unexpected records \['x'\]")]


@pytest.fixture(scope="module")
def flower_hostile():
    """Four in-process Flower nodes; c3's replies are rewritten as records by ``_tamper`` (what a node running
    its own code could send), chosen by the ``hostile`` key the test sets."""
    pytest.importorskip("flwr")
    from fedkt.federation import flower_codec
    from fedkt.federation.flower import FlowerFederation

    real_encode = flower_codec.encode
    chosen: dict[str, str] = {}

    def encode(msg, max_bytes=flower_codec.DEFAULT_MAX_BYTES):
        rd = real_encode(msg, max_bytes)
        if chosen.get("case") and msg.meta.get("num_examples") == 40:  # c3's reply
            return _tamper(chosen["case"], rd)
        return rd

    flower_codec.encode = encode
    fed = FlowerFederation.in_process([f"c{i}" for i in range(4)],
                                      {"fit": lambda ctx, m: honest_reply(ctx.cid, m.tensors)},
                                      on_failure="skip", timeout=60)
    try:
        yield fed, chosen
    finally:
        fed.close()
        flower_codec.encode = real_encode


@pytest.mark.parametrize("case,msg", FLOWER_CASES, ids=[c[0] for c in FLOWER_CASES])
def test_hostile_flower_records_are_that_clients_failure(flower_hostile, case, msg):
    import re

    fed, chosen = flower_hostile
    before = len(fed.failures)
    chosen["case"] = case
    try:
        theta = fit_round(fed, STATE, 2, 1.0)
    finally:
        chosen.clear()
    new = fed.failures[before:]
    assert [f["client"] for f in new] == [EVIL] and re.search(msg, new[0]["error"]), new
    for k, v in expected_round2(STATE).items():
        assert torch.allclose(theta[k], v, atol=1e-6), k


def test_duplicate_identify_replies_refuse_both_nodes(capsys):
    """Two nodes claim client c0: neither is trusted; the others are served, and a run over them works."""
    pytest.importorskip("flwr")
    from fedkt.federation.flower import FlowerFederation
    from fedkt.federation.flower_client_app import make_client_app
    from fedkt.federation.flower_engine import InProcessFlower
    from fedkt.federation.flower_spec import CLIENT_ID_KEY

    engine = InProcessFlower(make_client_app({"fit": lambda ctx, m: honest_reply(ctx.cid, m.tensors)}),
                             ["c0", "c1", "c2", "c3"], node_configs={"c3": {CLIENT_ID_KEY: "c0"}})
    try:
        fed = FlowerFederation(engine.grid, None, on_failure="skip", num_clients=4, wait_for_nodes=30)
        assert fed.clients == ["c1", "c2"]
        assert "both claim client 'c0'; both refused" in " ".join(capsys.readouterr().err.split())
        got = fed.call("fit", {c: Message(tensors=STATE, meta={"round": 1}) for c in fed.clients}, round=1)
        assert sorted(got) == ["c1", "c2"]
    finally:
        engine.close()


def test_slow_loris_client_is_dropped_at_the_timeout():
    """A client that does not answer within the federation's timeout is that call's failure; the others'
    replies are used (Flower in process; deployment timeouts: the deploy work of issue 20)."""
    pytest.importorskip("flwr")
    import time as _time

    from fedkt.federation.flower import FlowerFederation

    def fit(ctx, msg):
        if ctx.cid == EVIL:
            _time.sleep(6)
        return honest_reply(ctx.cid, msg.tensors)

    fed = FlowerFederation.in_process([f"c{i}" for i in range(4)], {"fit": fit}, on_failure="skip",
                                      timeout=2.5, num_workers=4)
    try:
        t0 = _time.perf_counter()
        theta = fit_round(fed, STATE, 2, 1.0)
        assert _time.perf_counter() - t0 < 5.5
        assert [f["client"] for f in fed.failures] == [EVIL] and "no reply within 2.5 s" in fed.failures[0]["error"]
        for k, v in expected_round2(STATE).items():
            assert torch.allclose(theta[k], v, atol=1e-6), k
        _time.sleep(4)  # let the sleeping handler finish before the engine closes
    finally:
        fed.close()


# ----------------------------------------------------------------------- other handlers' schemas
GOOD_SYNTH = {"tasks": ["arc_easy"], "generated": 2, "parsed": 1, "rejected": {"format": 1}, "label_agree": 1,
              "dp": {"epsilon": 1.0}, "raw_samples": ["q"], "randomness": "csprng"}


@pytest.mark.parametrize("method,reply,msg", [
    ("synthesize", Message(texts=["a", "b"], meta=GOOD_SYNTH), r"2 texts but 1 task tags"),
    ("synthesize", Message(texts=["a"], meta={**GOOD_SYNTH, "timings": {"dp_train_s": 0.1}}),
     r"unexpected meta key 'timings'"),  # a side channel (issue 19): refused by the server too
    ("synthesize", Message(texts=["a"], meta={**GOOD_SYNTH, "randomness": {"seed": 1}}), r"meta\['randomness'\]"),
    ("synthesize", Message(texts=["a"], tensors={"x": torch.zeros(1)}, meta=GOOD_SYNTH), r"this handler replies none"),
    ("encode", Message(texts=["p"], meta={"epsilon_per_token": 1.0, "tokens": 3, "changed_fraction": 0.0,
                                          "prompt_epsilon_mean": 3.0, "prompt_epsilon_max": 3.0}),
     r"unexpected meta key 'changed_fraction'"),
    ("encode", Message(texts=["p"], meta={"epsilon_per_token": -1.0, "tokens": 3, "prompt_epsilon_mean": 3.0,
                                          "prompt_epsilon_max": 3.0}), r"epsilon_per_token'\] = -1.0 is not"),
    ("train_and_evaluate", Message(meta={"metrics": {"arc": {"acc": "high"}}, "loss": 1.0}), r"meta\['metrics'\]"),
    ("train_and_evaluate", Message(meta={"metrics": {}, "num_examples": -3}), r"num_examples'\] = -3"),
    # no fedkt client may send a loss here (outbound allow-list), so the server, whose schemas are derived from
    # the same declaration (fedkt.reply_schemas), refuses it too
    ("train_and_evaluate", Message(meta={"metrics": {}, "loss": 1.0}), r"unexpected meta key 'loss'; allowed: "
                                                                      r"correct, metrics, num_examples, synthetic, "
                                                                      r"trained_on"),
    # per-question correctness: 0/1 strings of one length per task, with the ids' fingerprint
    ("train_and_evaluate", Message(meta={"metrics": {}, "correct": {"arc": {"ids": "f", "acc": "01", "acc_norm": "1"}}}),
     r"meta\['correct'\]"),
    ("train_and_evaluate", Message(meta={"metrics": {}, "correct": {"arc": {"ids": "f", "acc": "0x"}}}),
     r"meta\['correct'\]")])
def test_other_handler_schemas_refuse(method, reply, msg):
    with pytest.raises(validate.ReplyError, match=msg):
        validate.check_reply(method, "c1", reply)


@pytest.mark.parametrize("method,reply", [
    ("synthesize", Message(texts=["a"], meta=GOOD_SYNTH)),
    ("encode", Message(texts=["p"], meta={"epsilon_per_token": float("inf"), "tokens": 3, "randomness": "simulation",
                                          "prompt_epsilon_mean": float("inf"), "prompt_epsilon_max": float("inf")})),
    ("train_and_evaluate", Message(meta={"metrics": {"arc": {"acc": 0.5, "n": float("nan")}},
                                         "trained_on": 0, "synthetic": 0})),
    ("train_and_evaluate", Message(meta={"metrics": {"arc": {"acc": 0.5, "n": 2}}, "num_examples": 3,
                                         "correct": {"arc": {"ids": "f", "acc": "01", "acc_norm": "11"}}}))])
def test_other_handler_schemas_accept_what_fedkt_clients_send(method, reply):
    validate.check_reply(method, "c1", reply)


# ------------------------------------------------------------------- a whole run: results and checkpoints
def test_fedavg_run_with_a_hostile_client_keeps_results_and_checkpoints_intact(tmp_path, model_dirs, data_dir,
                                                                              monkeypatch):
    """A real (tiny) FedAvg run under skip whose client c2 replies a NaN adapter in round 2: the run finishes,
    results.json names c2, round 2's checkpoint is finite and is the mean of the two honest clients'
    adapters (recomputed from what they replied), and the saved final adapter is that checkpoint."""
    from test_runs import tiny_config

    from fedkt.models import load_adapter_state
    from fedkt.rounds import Checkpoints
    from fedkt.experiment import run_experiment

    from fedkt import registry

    honest_fit = registry.get("fedavg").handlers["fit"]  # the honest client, its policy guard included
    sent: dict[int, list] = {}

    def fit(ctx, msg):
        reply = honest_fit(ctx, msg)
        rnd = msg.meta["round"]
        if ctx.cid.endswith("2") and rnd == 2:
            return Message(tensors={k: v * float("nan") for k, v in reply.tensors.items()}, meta=reply.meta)
        sent.setdefault(rnd, []).append((reply.meta["num_examples"], {k: v.clone() for k, v in reply.tensors.items()}))
        return reply

    monkeypatch.setitem(registry.get("fedavg").handlers, "fit", fit)  # c2 turns hostile after its guard
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedavg"], **{"federation.on_client_failure": '"skip"'})
    res = run_experiment(cfg, tmp_path / "run")["methods"]["fedavg"]
    assert [(f["round"], f["method"], f["client"][-1]) for f in res["failures"]] == [(2, "fit", "2")]
    assert "holds NaN or infinite values" in res["failures"][0]["error"]
    _, state, saved = Checkpoints(tmp_path / "run", "fedavg").latest()
    assert saved["round"] == 2 and len(sent[2]) == 2
    total = sum(n for n, _ in sent[2])
    for k, v in state["slm"].items():
        want = sum(t[k].double() * n / total for n, t in sent[2]).to(v.dtype)
        assert torch.isfinite(v).all() and torch.equal(v, want), k
    final = load_adapter_state(tmp_path / "run" / "adapters" / "fedavg" / "slm")
    assert all(torch.equal(final[k], state["slm"][k]) for k in final)
