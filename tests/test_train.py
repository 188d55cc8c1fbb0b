import torch
import torch.nn.functional as F

from fedkt.config import LoraSettings, TrainConfig
from fedkt.data.collate import IGNORE, collate_sft, make_sft_example
from fedkt.data.tasks import parse_row
from fedkt.losses import answer_ce
from fedkt.models import add_lora, get_adapter_state, load_model
from fedkt.train import batch_order, sft


def test_answer_only_labels(tok):
    ex = make_sft_example(tok, "Question: Which planet?\nAnswer:", " Mercury", 64)
    n_prompt = sum(1 for x in ex.labels if x == IGNORE)
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:] and ex.labels[-1] == tok.eos_token_id
    long = make_sft_example(tok, "Question: " + "water " * 200 + "\nAnswer:", " Mercury", 32)
    assert len(long.input_ids) == 32 and long.labels[-1] == tok.eos_token_id  # answer kept, prompt cut


def test_answer_ce_matches_manual():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 1, 2, 6, 0]])
    manual, n = 0.0, 0
    for b in range(2):
        for t in range(1, 5):
            if labels[b, t] != IGNORE:
                manual += -F.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
                n += 1
    assert torch.allclose(answer_ce(logits, labels), manual / n)


def test_batch_order_epochs():
    b = batch_order(10, 4, 1.0, seed=0)
    assert len(b) == 3 and sorted(i for x in b for i in x) == list(range(10))
    assert len(batch_order(10, 4, 2.5, seed=0)) == 8
    assert batch_order(10, 4, 2, seed=1) == batch_order(10, 4, 2, seed=1)


def test_sft_lowers_loss_and_is_seeded(model_dirs, tok):
    exs = [parse_row({"id": str(i), "question": "Which planet is closest to the Sun?",
                      "choices": ["Mercury", "Mars"], "answer": 0}, "t", str(i)) for i in range(8)]
    cfg = TrainConfig(lr=5e-3, epochs=6, batch_size=4, warmup_ratio=0.0)
    results = []
    for _ in range(2):
        model, _ = load_model(str(model_dirs["slm"]))
        pm = add_lora(model, LoraSettings(r=4, dropout=0.0))
        stats = sft(pm, tok, exs, cfg, seed=3)
        results.append((stats, get_adapter_state(pm)))
    (s1, a1), (s2, a2) = results
    assert s1.steps == 12 and s1.last_loss < s1.mean_loss
    batch = collate_sft([make_sft_example(tok, "Question: Which planet is closest to the Sun?\nAnswer:", " Mercury", 64)],
                        tok.pad_token_id)
    assert all(torch.equal(a1[k], a2[k]) for k in a1)  # same seed -> bit-identical adapters
    model, _ = load_model(str(model_dirs["slm"]))
    fresh = answer_ce(model(input_ids=batch["input_ids"]).logits, batch["labels"]).item()
    assert s1.last_loss < fresh


def test_answer_loss_runs_the_lm_head_on_answer_positions_only(model_dirs, tok):
    """``answer_loss`` (LM head on the positions that predict answer tokens) gives the loss and the LoRA
    gradients of ``answer_ce`` over full logits, and the head really sees only those positions."""
    from fedkt.train import answer_loss

    model, _ = load_model(str(model_dirs["slm"]))
    pm = add_lora(model, LoraSettings(r=4, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    items = [make_sft_example(tok, "Question: Which planet is closest to the Sun?\nAnswer:", " Mercury", 64),
             make_sft_example(tok, "Question: What do plants take in?\nAnswer:", " carbon dioxide", 64),
             make_sft_example(tok, "Q:\nA:", " water", 64)]
    batch = collate_sft(items, tok.pad_token_id)
    n_sup = int((batch["labels"] != IGNORE).sum())
    assert n_sup < batch["labels"].numel() // 2  # most positions are prompt or padding
    params = [p for p in pm.parameters() if p.requires_grad]
    full = answer_ce(pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    g_full = torch.autograd.grad(full, params)
    seen = []
    h = pm.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    try:
        fast = answer_loss(pm, batch)
    finally:
        h.remove()
    g_fast = torch.autograd.grad(fast, params)
    assert seen == [(n_sup, len(tok))]  # the vocabulary projection ran on the supervised positions only
    assert torch.allclose(fast, full, rtol=1e-6, atol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g_fast, g_full))
