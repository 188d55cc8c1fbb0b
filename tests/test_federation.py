"""FedAvg aggregation by hand and the codec; runtime behaviour is in test_runtime_conformance.py."""

import pytest
import torch

from fedkt.algorithms.fedavg import aggregate
from fedkt.federation import Message
from fedkt.federation import codec


def test_fedavg_hand_computed():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    out = aggregate([a, b], [1, 3])  # (1*a + 3*b) / 4
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(out["b"], torch.tensor([[3.0]]))
    assert out["w"].dtype == torch.float32
    eq = aggregate([a, b], [5, 5])
    assert torch.allclose(eq["w"], torch.tensor([2.0, 4.0]))


def test_fedavg_errors():
    with pytest.raises(ValueError, match="different keys"):
        aggregate([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="nothing to aggregate"):
        aggregate([], [])
    with pytest.raises(ValueError, match="sum to > 0"):
        aggregate([{"a": torch.zeros(1)}], [0])


def test_codec_round_trip_bit_exact():
    msg = Message(tensors={"x": torch.randn(3, 4), "h": torch.randn(5).to(torch.bfloat16),
                           "i": torch.arange(6).reshape(2, 3)},
                  texts=["héllo", "world"], meta={"round": 3, "loss": 0.25, "nested": {"a": [1, 2]}})
    back = codec.decode(codec.encode(msg))
    assert back.texts == msg.texts and back.meta == msg.meta
    for k, v in msg.tensors.items():
        assert back.tensors[k].dtype == v.dtype and torch.equal(back.tensors[k], v)
    empty = codec.decode(codec.encode(Message()))
    assert empty.tensors == {} and empty.texts == [] and empty.meta == {}
