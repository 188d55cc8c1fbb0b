"""FedCoLLM's server step: gradient routing, the λ = 0 reduction, KD progress, vocabulary checks."""

import pytest
import torch

from fedkt.algorithms.fedcollm import FedCoLLMConfig, check_shared_vocabulary, mutual_distill, mutual_losses
from fedkt.config import LoraSettings, TrainConfig
from fedkt.data.collate import collate_sft
from fedkt.data.tasks import parse_row
from fedkt.losses import answer_ce
from fedkt.models import add_lora, get_adapter_state, load_model, set_adapter_state
from fedkt.train import sft, tokenize_examples

from conftest import MC_ROWS, make_tokenizer


def pair(model_dirs, seed=0):
    slm, tok = load_model(str(model_dirs["slm"]))
    llm, _ = load_model(str(model_dirs["llm"]))
    slm = add_lora(slm, LoraSettings(r=4, dropout=0.0), seed=seed)
    llm = add_lora(llm, LoraSettings(r=4, dropout=0.0), seed=seed + 1)
    # non-zero B so both A and B receive gradient and the adapters change the outputs
    for m in (slm, llm):
        g = torch.Generator().manual_seed(5)
        set_adapter_state(m, {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in get_adapter_state(m).items()})
    return slm, llm, tok


def aux_examples(n=16):
    return [parse_row({"id": str(i), "question": q, "choices": {"text": ch, "label": [chr(65 + j) for j in range(len(ch))]},
                       "answerKey": k}, "arc_easy", str(i)) for i, (q, ch, k) in enumerate((MC_ROWS * 8)[:n])]


def batch(tok, n=4):
    return collate_sft(tokenize_examples(tok, aux_examples(n), 64), tok.pad_token_id)


def lora_params(m):
    return {n: p for n, p in m.named_parameters() if p.requires_grad}


def test_gradients_of_each_loss_reach_only_its_own_adapter(model_dirs):
    slm, llm, tok = pair(model_dirs)
    cfg = FedCoLLMConfig(kd_lambda=1.0, temperature=2.0)
    b = batch(tok)
    for own, other, key in ((slm, llm, "loss_g"), (llm, slm, "loss_f")):
        for m in (slm, llm):
            m.zero_grad(set_to_none=True)
        losses = mutual_losses(slm, llm, b, cfg)
        losses[key].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params(own).values()), key
        assert all(p.grad is None for p in lora_params(other).values()), key
        assert all(p.grad is None for n, p in own.named_parameters() if not p.requires_grad)
    # the KD terms alone are non-zero and differentiable w.r.t. the student's adapter only
    for m in (slm, llm):
        m.zero_grad(set_to_none=True)
    losses = mutual_losses(slm, llm, b, cfg)
    assert losses["kl_g"].item() > 0 and losses["kl_f"].item() > 0
    losses["kl_g"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params(slm).values())
    assert all(p.grad is None for p in lora_params(llm).values())


def test_lambda_zero_reduces_to_plain_sft(model_dirs):
    """With λ = 0 one mutual step equals one SFT step of each model on the same batch."""
    aux = aux_examples(8)
    cfg = FedCoLLMConfig(kd_steps=1, kd_lambda=0.0, batch_size=8, lr_slm=1e-2, lr_llm=2e-2)
    slm, llm, tok = pair(model_dirs)
    mutual_distill(slm, llm, tok, aux, cfg, max_length=64, max_grad_norm=1.0, seed=0)
    kd_s, kd_l = get_adapter_state(slm), get_adapter_state(llm)

    slm2, llm2, _ = pair(model_dirs)
    tcfg = dict(batch_size=8, epochs=1, warmup_ratio=0.0, schedule="constant", max_grad_norm=1.0)
    sft(slm2, tok, aux, TrainConfig(lr=1e-2, **tcfg), seed=0)
    sft(llm2, tok, aux, TrainConfig(lr=2e-2, **tcfg), seed=0)
    for a, b in ((kd_s, get_adapter_state(slm2)), (kd_l, get_adapter_state(llm2))):
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # and with λ > 0 the result differs
    slm3, llm3, _ = pair(model_dirs)
    mutual_distill(slm3, llm3, tok, aux, FedCoLLMConfig(kd_steps=1, kd_lambda=1.0, batch_size=8, lr_slm=1e-2,
                                                        lr_llm=2e-2), 64, 1.0, seed=0)
    s3 = get_adapter_state(slm3)
    assert not all(torch.allclose(kd_s[k], s3[k], atol=1e-6) for k in s3)


@torch.no_grad()
def kd_divergence(slm, llm, tok, examples, cfg: FedCoLLMConfig, max_length: int) -> dict[str, float]:
    """Mean KD terms on ``examples`` (no update): how far apart the two models are. ``kl_g`` is the SLM's
    (KL(f‖g) with ``kl_direction = "forward"``), ``kl_f`` the LLM's (KL(g‖f))."""
    data = tokenize_examples(tok, examples, max_length)
    tot = {"kl_g": 0.0, "kl_f": 0.0}
    n = 0
    for s in range(0, len(data), cfg.batch_size):
        batch = collate_sft(data[s:s + cfg.batch_size], tok.pad_token_id)
        losses = mutual_losses(slm, llm, batch, cfg)
        for k in tot:
            tot[k] += losses[k].item() * len(batch["input_ids"])
        n += len(batch["input_ids"])
    return {k: v / n for k, v in tot.items()}


def test_one_round_of_distillation_lowers_kd_loss(model_dirs):
    slm, llm, tok = pair(model_dirs)
    aux = aux_examples(16)
    cfg = FedCoLLMConfig(kd_steps=12, kd_lambda=5.0, batch_size=8, lr_slm=3e-2, lr_llm=3e-2, temperature=2.0)
    before = kd_divergence(slm, llm, tok, aux, cfg, 64)
    stats = mutual_distill(slm, llm, tok, aux, cfg, 64, 1.0, seed=0)
    after = kd_divergence(slm, llm, tok, aux, cfg, 64)
    assert stats["steps"] == 12
    # measured 0.786 of the start in both directions
    assert after["kl_g"] < 0.9 * before["kl_g"] and after["kl_f"] < 0.9 * before["kl_f"]
    assert stats["kl_g_last"] < stats["kl_g_first"]


def test_topk_option_runs_and_equals_full_at_vocab_size(model_dirs):
    slm, llm, tok = pair(model_dirs)
    b = batch(tok)
    full = mutual_losses(slm, llm, b, FedCoLLMConfig(top_k=0))
    k_v = mutual_losses(slm, llm, b, FedCoLLMConfig(top_k=len(tok)))
    k_8 = mutual_losses(slm, llm, b, FedCoLLMConfig(top_k=8))
    assert torch.allclose(full["kl_g"], k_v["kl_g"], atol=1e-5)
    assert not torch.allclose(full["kl_g"], k_8["kl_g"], atol=1e-5)


def test_answer_only_kd_positions(model_dirs):
    slm, llm, tok = pair(model_dirs)
    b = batch(tok)
    all_ = mutual_losses(slm, llm, b, FedCoLLMConfig(kd_tokens="all"))
    ans = mutual_losses(slm, llm, b, FedCoLLMConfig(kd_tokens="answer"))
    assert torch.allclose(all_["ce_g"], ans["ce_g"]) and not torch.allclose(all_["kl_g"], ans["kl_g"])


def test_vocabulary_mismatch_is_a_clear_error(model_dirs, tok):
    from conftest import make_llama

    slm, _ = load_model(str(model_dirs["slm"]))
    llm, _ = load_model(str(model_dirs["llm"]))
    check_shared_vocabulary(tok, tok, slm, llm)
    other = make_llama(tok)
    other.resize_token_embeddings(len(tok) + 5)
    with pytest.raises(ValueError, match="must share a tokenizer and vocabulary .*fedkt derive-slm"):
        check_shared_vocabulary(tok, tok, slm, other)


def test_no_aux_data_is_a_clear_error(model_dirs):
    slm, llm, tok = pair(model_dirs)
    with pytest.raises(ValueError, match="partition.aux_size > 0"):
        mutual_distill(slm, llm, tok, [], FedCoLLMConfig(), 64, 1.0, seed=0)
