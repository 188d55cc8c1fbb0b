"""DP-SGD on a LoRA adapter: per-sample gradients, clipping, noise, accounting, model restored."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import MC_ROWS, make_llama
from fedkt.config import LoraSettings
from fedkt.data.collate import collate_sft
from fedkt.data.tasks import Example
from fedkt.losses import answer_ce
from fedkt.models import add_lora, get_adapter_state
from fedkt.privacy.dp_sgd import (DPConfig, batch_loss, dp_train_loop, effective_delta, epsilon_for,
                                  per_sample_answer_ce, per_sample_grads, planned_steps, sample_rate)
from fedkt.train import tokenize_examples


def dp_train(model, tok, examples, cfg, seed):
    """DP-SGD fine-tuning of ``model``'s adapter on ``examples`` (what FDKT's client does after tokenising)."""
    return dp_train_loop(model, tokenize_examples(tok, examples, cfg.max_length), cfg, seed, tok.pad_token_id)


def examples(n: int) -> list[Example]:
    out = []
    for i in range(n):
        q, ch, key = MC_ROWS[i % len(MC_ROWS)]
        gold = "ABCD".index(key)
        # vary the length so batches are really padded
        out.append(Example("arc_easy", f"q{i}", f"{q} ({i})" + " why?" * (i % 3), tuple(ch), gold, ch[gold]))
    return out


def lora_model(tok, seed: int = 0, dropout: float = 0.0):
    """Tiny Llama + LoRA whose B matrices are random (fresh LoRA has B = 0, which zeroes A's gradient)."""
    model = add_lora(make_llama(tok, layers=2, seed=seed), LoraSettings(r=4, alpha=8, dropout=dropout), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def manual_grads(model, tok, exs) -> list[dict[str, torch.Tensor]]:
    """Each example alone (no padding) through the model with fedkt.losses.answer_ce."""
    data = tokenize_examples(tok, exs, 256)
    params = lora_params(model)
    model.train()
    out = []
    for d in data:
        b = collate_sft([d], tok.pad_token_id)
        loss = answer_ce(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        gs = torch.autograd.grad(loss, list(params.values()))
        out.append(dict(zip(params, gs)))
    model.eval()
    return out


def flat_norm(g: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in g.values())))


# --------------------------------------------------------------------------------------------------


def test_config_validation_names_the_key():
    assert DPConfig().target_epsilon == 3.0 and DPConfig().delta == 1e-5
    for kwargs, key in [({"target_epsilon": 0}, "target_epsilon"), ({"target_epsilon": math.inf}, "target_epsilon"),
                        ({"delta": 1.0}, "delta"), ({"max_grad_norm": 0}, "max_grad_norm"),
                        ({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"), ({"lr": -1}, "lr"),
                        ({"accountant": "gdp"}, "accountant"), ({"optimizer": "adam"}, "optimizer"),
                        ({"noise_multiplier": -0.1}, "noise_multiplier"), ({"max_steps": -1}, "max_steps")]:
        with pytest.raises(ValueError, match=f"DPConfig.{key}"):
            DPConfig(**kwargs)


def test_sampling_plan_and_delta():
    assert sample_rate(100, 8) == 0.08 and sample_rate(5, 8) == 1.0
    assert planned_steps(100, DPConfig(batch_size=8, epochs=2)) == 25
    assert planned_steps(100, DPConfig(batch_size=8, epochs=2, max_steps=7)) == 7
    assert planned_steps(5, DPConfig(batch_size=8, epochs=3)) == 3  # q = 1: one step per epoch
    assert effective_delta(1e-5, 100) == 1e-5  # 1/n² = 1e-4 is looser
    assert effective_delta(1e-5, 1000) == 1e-6  # 1/n² = 1e-6 is tighter


def test_per_sample_loss_is_answer_ce_of_each_row(tok):
    model = lora_model(tok)
    data = tokenize_examples(tok, examples(5), 256)
    batch = collate_sft(data, tok.pad_token_id)
    assert len({len(d.input_ids) for d in data}) > 1  # padded
    with torch.no_grad():
        per = batch_loss(model, batch)
        for i, d in enumerate(data):
            b = collate_sft([d], tok.pad_token_id)
            alone = answer_ce(model(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits, b["labels"])
            assert per[i].item() == pytest.approx(alone.item(), abs=1e-5)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 5, -100]])
    want0 = answer_ce(logits[:1], labels[:1])
    want1 = torch.nn.functional.cross_entropy(logits[1, 1:2], labels[1, 2:3])
    assert torch.allclose(per_sample_answer_ce(logits, labels), torch.stack([want0, want1]), atol=1e-6)


def test_opacus_per_sample_grads_equal_manual_loop(tok):
    model = lora_model(tok)
    exs = examples(5)
    batch = collate_sft(tokenize_examples(tok, exs, 256), tok.pad_token_id)
    got = per_sample_grads(model, batch)
    want = manual_grads(model, tok, exs)
    assert set(got) == set(lora_params(model)) and len(got) == 16  # 2 layers x q,k,v,o x A,B
    for name, g in got.items():
        assert g.shape[0] == 5
        for i in range(5):
            ref = want[i][name]
            assert ref.abs().max() > 1e-4  # a real gradient, not 0 == 0
            torch.testing.assert_close(g[i], ref, atol=1e-5, rtol=1e-4)
    # no Opacus state left behind: hooks removed, no grad_sample attributes
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def run_full_batch(tok, exs, C: float, sigma: float, seed: int = 0, **kw):
    """One DP-SGD step with q = 1 (every example in the batch), plain SGD at lr 1, so that
    W1 = W0 - (sum_i clip_C(g_i) + N(0, σ²C²)) / n."""
    model = lora_model(tok)
    before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    cfg = DPConfig(batch_size=len(exs), max_steps=1, max_grad_norm=C, noise_multiplier=sigma, optimizer="sgd",
                   lr=1.0, **kw)
    stats = dp_train(model, tok, exs, cfg, seed=seed)
    update = {n: before[n] - p.detach() for n, p in lora_params(model).items()}
    return model, stats, update, before


def test_clipping_bounds_every_sample_and_scales_large_ones_to_C(tok):
    exs = examples(6)
    grads = manual_grads(lora_model(tok), tok, exs)
    norms = sorted(flat_norm(g) for g in grads)
    C = (norms[2] + norms[3]) / 2  # half the samples are clipped, half are not
    _, stats, update, _ = run_full_batch(tok, exs, C, sigma=0.0)
    assert stats.steps == 1 and stats.sample_rate == 1.0 and stats.empty_batches == 0
    assert stats.epsilon_spent == math.inf  # no noise, no privacy
    clipped = []
    for g in grads:
        factor = min(1.0, C / (flat_norm(g) + 1e-6))  # Opacus's flat clipping factor
        clipped.append({n: t * factor for n, t in g.items()})
        cn = flat_norm(clipped[-1])
        assert cn <= C + 1e-6
        if flat_norm(g) > C:  # a large gradient is scaled to exactly C
            assert cn == pytest.approx(C, rel=1e-5)
        else:  # a small one is untouched
            assert cn == pytest.approx(flat_norm(g), rel=1e-6)
    assert sum(flat_norm(g) > C for g in grads) == 3
    for name, u in update.items():
        want = sum(c[name] for c in clipped) / len(exs)
        torch.testing.assert_close(u, want, atol=1e-6, rtol=1e-4)
    # the unclipped mean differs: clipping really happened
    assert flat_norm({n: sum(g[n] for g in grads) / len(exs) - update[n] for n in update}) > 1e-3


def test_noise_is_gaussian_with_std_sigma_C_and_seeded(tok):
    exs = examples(4)
    C, sigma = 0.5, 0.8
    _, _, clean, _ = run_full_batch(tok, exs, C, sigma=0.0)
    _, stats, noisy, _ = run_full_batch(tok, exs, C, sigma=sigma, seed=0)
    _, _, again, _ = run_full_batch(tok, exs, C, sigma=sigma, seed=0)
    _, _, other, _ = run_full_batch(tok, exs, C, sigma=sigma, seed=1)
    assert stats.noise_multiplier == sigma
    noise = torch.cat([((noisy[n] - clean[n]) * len(exs)).flatten() for n in clean])
    assert noise.numel() > 1500
    # std of N(0, (σC)²) from ~1800 draws: relative error ~1.7%; 6% is 3.5 standard errors
    assert noise.std().item() == pytest.approx(sigma * C, rel=0.06)
    assert abs(noise.mean().item()) < 4 * sigma * C / math.sqrt(noise.numel())
    assert all(torch.equal(noisy[n], again[n]) for n in noisy)  # same seed -> bit-identical
    assert all(not torch.allclose(noisy[n], other[n]) for n in noisy)  # other seed -> other noise


def test_base_frozen_bit_exact_and_model_restored(tok):
    model = lora_model(tok, dropout=0.05)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora0 = get_adapter_state(model)
    stats = dp_train(model, tok, examples(12), DPConfig(batch_size=4, max_steps=4, noise_multiplier=1.0), seed=3)
    assert stats.steps == 4
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in base)
    lora1 = get_adapter_state(model)  # still a plain peft model
    assert set(lora1) == set(lora0) and all(not torch.equal(lora1[k], lora0[k]) for k in lora0)
    assert type(model).__name__ == "PeftModelForCausalLM" and not model.training
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(m, "activations") for m in model.modules())
    assert not any(hasattr(p, a) for p in model.parameters() for a in ("grad_sample", "_forward_counter"))
    assert all(p.grad is None for p in model.parameters())
    # it can train again (hooks were really removed: Opacus refuses to hook a model twice)
    dp_train(model, tok, examples(12), DPConfig(batch_size=4, max_steps=1, noise_multiplier=1.0), seed=4)


def test_epsilon_is_the_accountants_and_meets_the_target(tok):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    n = 16
    cfg = DPConfig(target_epsilon=2.0, batch_size=4, epochs=1.5)
    stats = dp_train(lora_model(tok), tok, examples(n), cfg, seed=0)
    assert stats.steps == stats.planned_steps == 6 and stats.sample_rate == 0.25
    assert stats.delta == 1e-5 and stats.expected_batch_size == 4.0
    # recomputed independently from (σ, q, steps, δ)
    acc = RDPAccountant()
    for _ in range(stats.steps):
        acc.step(noise_multiplier=stats.noise_multiplier, sample_rate=stats.sample_rate)
    assert stats.epsilon_spent == pytest.approx(acc.get_epsilon(delta=stats.delta), rel=1e-12)
    alphas = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=0.25, noise_multiplier=stats.noise_multiplier, steps=6, orders=alphas)
    eps, _ = get_privacy_spent(orders=alphas, rdp=rdp, delta=1e-5)
    assert stats.epsilon_spent == pytest.approx(float(eps), rel=1e-12)
    assert stats.epsilon_spent == epsilon_for(stats.noise_multiplier, 0.25, 6, 1e-5)
    # calibrated: at most the target, within the bisection tolerance below it
    assert cfg.target_epsilon - 0.011 <= stats.epsilon_spent <= cfg.target_epsilon
    # less noise would overshoot the target
    assert epsilon_for(stats.noise_multiplier * 0.97, 0.25, 6, 1e-5) > cfg.target_epsilon


def test_empty_poisson_batches_are_noisy_counted_steps(tok):
    model = lora_model(tok)
    before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    # q = 1/3 over 3 examples: a batch is empty with probability 8/27
    cfg = DPConfig(batch_size=1, max_steps=12, noise_multiplier=1.0, optimizer="sgd", lr=0.1)
    stats = dp_train(model, tok, examples(3), cfg, seed=0)
    assert stats.steps == 12 and stats.empty_batches >= 1
    assert stats.delta == 1e-5 and stats.epsilon_spent == epsilon_for(1.0, 1 / 3, 12, 1e-5)
    assert all(not torch.equal(p, before[n]) for n, p in lora_params(model).items())


def test_empty_batch_alone_releases_pure_noise(tok):
    from fedkt.privacy import dp_sgd

    # an empty first batch must not crash and must still move the adapter by noise only
    model = lora_model(tok)
    before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    cfg = DPConfig(batch_size=1, max_steps=1, noise_multiplier=2.0, optimizer="sgd", lr=1.0, max_grad_norm=0.5)
    data = tokenize_examples(tok, examples(50), 256)
    seed = next(s for s in range(200) if not next(iter(_sampler(50, 1 / 50, s))))  # a seed whose batch is empty
    stats = dp_sgd.dp_train_loop(model, data, cfg, seed, tok.pad_token_id)
    assert stats.empty_batches == 1 and stats.steps == 1 and math.isnan(stats.mean_loss)
    noise = torch.cat([(before[n] - p.detach()).flatten() for n, p in lora_params(model).items()])
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 1.0, rel=0.08)  # σC / (q·n)


def _sampler(n, q, seed):
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from fedkt.privacy.dp_sgd import _sub_seed

    return UniformWithReplacementSampler(num_samples=n, sample_rate=q, steps=1,
                                         generator=torch.Generator().manual_seed(_sub_seed(seed, "dp-poisson")))


def test_physical_chunks_give_the_same_update(tok):
    exs = examples(7)
    _, _, whole, _ = run_full_batch(tok, exs, 0.3, sigma=0.0)
    _, _, chunked, _ = run_full_batch(tok, exs, 0.3, sigma=0.0, max_physical_batch=3)
    for n in whole:
        torch.testing.assert_close(chunked[n], whole[n], atol=1e-6, rtol=1e-5)


def test_prv_accountant(tok):
    # σ fixed: Opacus's PRV calibration takes ~7 s on 2 cores; the RDP test above covers calibration
    cfg = DPConfig(batch_size=4, max_steps=5, accountant="prv", noise_multiplier=1.1)
    stats = dp_train(lora_model(tok), tok, examples(16), cfg, seed=0)
    assert stats.accountant == "prv" and stats.steps == 5
    want = epsilon_for(1.1, 0.25, 5, 1e-5, "prv")
    assert stats.epsilon_spent == pytest.approx(want, rel=1e-6)
    # PRV is tighter than RDP's conversion to (ε, δ), and in the same range
    assert 0.5 * epsilon_for(1.1, 0.25, 5, 1e-5) < want < epsilon_for(1.1, 0.25, 5, 1e-5)


def _csprng_step(tok, exs, C, sigma, rng):
    from fedkt.privacy import dp_sgd

    model = lora_model(tok)
    before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    cfg = DPConfig(batch_size=len(exs), max_steps=1, max_grad_norm=C, noise_multiplier=sigma, optimizer="sgd", lr=1.0)
    stats = dp_sgd.dp_train_loop(model, tokenize_examples(tok, exs, 256), cfg, 0, tok.pad_token_id, rng=rng)
    return stats, {n: before[n] - p.detach() for n, p in lora_params(model).items()}


def test_client_randomness_sources_for_dp_sgd(tok):
    """A deployed client's DP-SGD noise and Poisson sampling come from the OS CSPRNG (fresh each run, the
    same N(0, σ²C²)); a pinned secret reproduces its run; the simulation seed path is the one above."""
    from fedkt.privacy.randomness import PinnedRandom, SecureRandom

    exs, C, sigma = examples(4), 0.5, 0.8
    _, _, clean, _ = run_full_batch(tok, exs, C, sigma=0.0)
    stats, one = _csprng_step(tok, exs, C, sigma, SecureRandom())
    _, two = _csprng_step(tok, exs, C, sigma, SecureRandom())
    assert stats.steps == 1 and stats.noise_multiplier == sigma
    noise = torch.cat([((one[n] - clean[n]) * len(exs)).flatten() for n in clean])
    assert noise.std().item() == pytest.approx(sigma * C, rel=0.06)
    assert abs(noise.mean().item()) < 4 * sigma * C / math.sqrt(noise.numel())
    assert all(not torch.allclose(one[n], two[n]) for n in one)  # never the same draws twice
    _, p1 = _csprng_step(tok, exs, C, sigma, PinnedRandom(2**100 + 5, "c0", "fdkt-dp"))
    _, p2 = _csprng_step(tok, exs, C, sigma, PinnedRandom(2**100 + 5, "c0", "fdkt-dp"))
    assert all(torch.equal(p1[n], p2[n]) for n in p1)  # reproducible by the secret's holder
    # CSPRNG uniforms and normals themselves
    u = SecureRandom().rand((200_000,))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.003
    z = SecureRandom().normal((200_000,), std=2.0, dtype=torch.float64)
    assert z.std().item() == pytest.approx(2.0, rel=0.01) and abs(z.mean().item()) < 0.02


def test_length_chunks_minimise_padding_plus_a_cost_per_chunk():
    from fedkt.privacy.dp_sgd import length_chunks

    # one long outlier: alone it costs 127 + 64; with the others 16 x 127 + 64 = 2096
    lens = [57, 59, 60, 62, 62, 64, 64, 66, 69, 70, 71, 73, 75, 77, 80, 127]
    got = length_chunks(lens, 16)
    assert got[-1] == (15, 16) and got[0][0] == 0 and all(a < b for a, b in got)
    assert all(got[i][1] == got[i + 1][0] for i in range(len(got) - 1))
    cost = lambda cs: sum((b - a) * lens[b - 1] + 64 for a, b in cs)  # noqa: E731
    assert cost(got) <= cost([(0, 15), (15, 16)]) < cost([(0, 16)])
    assert length_chunks([10, 10, 10, 10], 16) == [(0, 4)]  # equal lengths: one chunk
    assert length_chunks([10, 10, 10, 10], 3) == [(0, 1), (1, 4)]  # at most max_size (ties: the first cut found)
    assert length_chunks([1, 100], 2, overhead=0) == [(0, 1), (1, 2)]
    assert length_chunks([1, 100], 2, overhead=200) == [(0, 2)]
    assert length_chunks([], 4) == []
