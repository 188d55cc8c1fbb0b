"""Flower record codec: bit-exact round trips, size limit, malformed records."""

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from fedkt.federation import Message  # noqa: E402
from fedkt.federation import flower_codec as fc  # noqa: E402


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so NaN payloads and -0.0 compare exactly."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width) if t.dtype != torch.bool else t


def _assert_same(a: Message, b: Message) -> None:
    assert a.texts == b.texts and a.meta == b.meta
    assert list(a.tensors) == list(b.tensors)
    for k, v in a.tensors.items():
        w = b.tensors[k]
        assert w.dtype == v.dtype and w.shape == v.shape, k
        assert torch.equal(_bits(w), _bits(v)), k


def test_round_trip_bit_exact_all_dtypes():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-40, 3.0e38])
    msg = Message(
        tensors={
            "f32": torch.randn(3, 4, generator=g),
            "bf16": torch.cat([torch.randn(7, generator=g), special]).to(torch.bfloat16),
            "f16": torch.randn(2, 2, 2, generator=g).half(),
            "i64": torch.tensor([[-(2**63), 2**63 - 1], [0, -1]]),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 5),
            "noncontig": torch.arange(12.0).reshape(3, 4).t(),
            "mask": torch.tensor([True, False, True]),
            "f8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
        },
        texts=["héllo wörld", "日本語 ✓ 🚀", "", "line\nbreak \"quoted\""],
        meta={"round": 3, "loss": 0.1 + 0.2, "nested": {"a": [1, 2, {"b": None}], "ok": True}, "ε": 1e-300},
    )
    rd = fc.encode(msg)
    assert set(rd) == {fc.TENSORS_KEY, fc.HEADER_KEY}
    # the bf16 tensor travels as an int16 view of its bits: Flower's Array has no bfloat16
    assert rd[fc.TENSORS_KEY]["bf16"].dtype == "int16" and rd[fc.TENSORS_KEY]["f32"].dtype == "float32"
    back = fc.decode(rd)
    _assert_same(msg, back)
    assert back.meta["loss"] == 0.30000000000000004
    assert torch.isnan(back.tensors["bf16"][7]) and torch.signbit(back.tensors["bf16"][8])
    back.tensors["f32"] += 1  # decoded tensors are writable, not views of Flower's buffers


def test_round_trip_through_flower_wire_objects():
    """Deflate/inflate every Flower object as the transport does; the message must survive bit-exact."""
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    msg = Message(tensors={"w": torch.randn(4, 3).to(torch.bfloat16), "i": torch.arange(5)},
                  texts=["ü"], meta={"k": {"n": [1.5]}})
    rd = fc.encode(msg)
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(rd).items()}
    assert len(objects) > 3  # record dict, two records, arrays and their chunks travel separately
    rebuilt = inflate_object_from_contents(rd.object_id, objects, keep_object_contents=False)
    _assert_same(msg, fc.decode(rebuilt))


def test_empty_message():
    back = fc.decode(fc.encode(Message()))
    assert back.tensors == {} and back.texts == [] and back.meta == {}


def test_size_limit_names_the_largest_tensor():
    msg = Message(tensors={"small": torch.zeros(10), "big": torch.zeros(1000)}, texts=["x" * 100])
    assert fc.decode(fc.encode(msg, max_bytes=4100 + 200)).tensors["big"].shape == (1000,)
    with pytest.raises(ValueError, match=r"exceeds the Flower transport limit.*'big'.*split the call"):
        fc.encode(msg, max_bytes=4000)
    with pytest.raises(ValueError, match="exceeds"):
        fc.encode(Message(texts=["y" * 5000]), max_bytes=4000)


def test_bad_inputs_and_malformed_records():
    with pytest.raises(TypeError, match=r"tensors\['w'\] is a list"):
        fc.encode(Message(tensors={"w": [1.0]}))
    with pytest.raises(ValueError, match="JSON-serialisable"):
        fc.encode(Message(meta={"x": object()}))
    good = fc.encode(Message(tensors={"w": torch.ones(2)}, texts=["a"], meta={"k": 1}))

    def mutated(**header_changes):
        h = dict(good[fc.HEADER_KEY])
        h.update(header_changes)
        return RecordDict({fc.TENSORS_KEY: good[fc.TENSORS_KEY], fc.HEADER_KEY: ConfigRecord(h)})

    with pytest.raises(ValueError, match="expected a Flower RecordDict"):
        fc.decode({"x": 1})
    with pytest.raises(ValueError, match="needs an ArrayRecord"):
        fc.decode(RecordDict({fc.TENSORS_KEY: good[fc.TENSORS_KEY]}))
    with pytest.raises(ValueError, match=r"unexpected records \['other'\]"):
        fc.decode(RecordDict({**good, "other": ConfigRecord({"a": 1})}))
    with pytest.raises(ValueError, match="header version 7"):
        fc.decode(mutated(version=7))
    with pytest.raises(ValueError, match=r"\['meta'\] is not valid JSON"):
        fc.decode(mutated(meta="{oops"))
    with pytest.raises(ValueError, match=r"\['texts'\] must decode to a list"):
        fc.decode(mutated(texts='"abc"'))
    with pytest.raises(ValueError, match=r"\['texts'\] must be a list of strings"):
        fc.decode(mutated(texts="[1, 2]"))
    with pytest.raises(ValueError, match=r"\['meta'\] must be a JSON string, got int"):
        fc.decode(mutated(meta=5))
    with pytest.raises(ValueError, match="unknown dtype 'float99'"):
        fc.decode(mutated(dtypes='{"w": "float99"}'))
    with pytest.raises(ValueError, match="dtypes name tensors"):
        fc.decode(mutated(dtypes="{}"))
    with pytest.raises(ValueError, match="carries float32.*expected int16.*bfloat16"):
        fc.decode(mutated(dtypes='{"w": "bfloat16"}'))
    liar = RecordDict({fc.TENSORS_KEY: ArrayRecord({"w": Array("float32", (3,), "numpy.ndarray", b"junk")}),
                       fc.HEADER_KEY: good[fc.HEADER_KEY]})
    with pytest.raises(ValueError, match="tensor 'w' cannot be decoded"):
        fc.decode(liar)
