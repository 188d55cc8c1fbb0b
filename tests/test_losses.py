import math

import torch

from fedkt.losses import kd_kl


def test_kl_matches_hand_computation():
    # one position, vocabulary of 3
    s = torch.tensor([[[0.0, 1.0, 2.0]]])
    t = torch.tensor([[[2.0, 0.0, 0.0]]])
    mask = torch.tensor([[True]])
    for T in (1.0, 2.0):
        pt = [math.exp(x / T) for x in (2.0, 0.0, 0.0)]
        pt = [x / sum(pt) for x in pt]
        ps = [math.exp(x / T) for x in (0.0, 1.0, 2.0)]
        ps = [x / sum(ps) for x in ps]
        expected = sum(a * math.log(a / b) for a, b in zip(pt, ps)) * T * T
        assert abs(kd_kl(s, t, mask, T).item() - expected) < 1e-6


def test_kl_masked_mean_and_zero_for_equal():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    full = kd_kl(s, t, torch.ones(2, 3, dtype=torch.bool), 1.0)
    part = kd_kl(s, t, mask, 1.0)
    manual = torch.stack([kd_kl(s[b:b + 1, i:i + 1], t[b:b + 1, i:i + 1], torch.ones(1, 1, dtype=torch.bool))
                          for b, i in [(0, 0), (0, 2), (1, 2)]]).mean()
    assert torch.allclose(part, manual, atol=1e-6) and not torch.allclose(full, part)
    assert kd_kl(t, t, mask, 2.0).abs().item() < 1e-6


def test_topk_equals_full_when_k_is_vocab():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 11), torch.randn(2, 4, 11)
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert torch.allclose(kd_kl(s, t, mask, 2.0, top_k=11), kd_kl(s, t, mask, 2.0), atol=1e-6)
    assert torch.allclose(kd_kl(s, t, mask, 2.0, top_k=50), kd_kl(s, t, mask, 2.0), atol=1e-6)
    assert not torch.allclose(kd_kl(s, t, mask, 2.0, top_k=3), kd_kl(s, t, mask, 2.0))


def test_teacher_gets_no_gradient():
    s = torch.randn(1, 2, 5, requires_grad=True)
    t = torch.randn(1, 2, 5, requires_grad=True)
    kd_kl(s, t, torch.ones(1, 2, dtype=torch.bool), 2.0, top_k=3).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
