"""derive-slm on a tiny random parent: exact layer copy, same tokenizer, healing helps, plain reload."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedkt.config import DeriveConfig
from fedkt.derive import build_child, derive, select_layers

from conftest import make_llama


def test_select_layers():
    assert select_layers(30, 9, "spread") == [0, 4, 7, 11, 14, 18, 22, 25, 29]
    assert select_layers(30, 4, "first") == [0, 1, 2, 3]
    assert select_layers(10, 5, "ends") == [0, 1, 2, 8, 9]
    assert select_layers(5, 1) == [0]
    with pytest.raises(ValueError, match=r"num_layers = 31 must be in \[1, 30\]"):
        select_layers(30, 31)
    with pytest.raises(ValueError, match="strategy"):
        select_layers(30, 3, "random")


def test_child_keeps_chosen_weights_bit_exact(tok):
    parent = make_llama(tok, layers=6, seed=3)
    child = build_child(parent, [0, 2, 5])
    assert child.config.num_hidden_layers == 3 and parent.config.num_hidden_layers == 6
    ps, cs = parent.state_dict(), child.state_dict()
    for dst, src in enumerate([0, 2, 5]):
        for k, v in cs.items():
            if k.startswith(f"model.layers.{dst}."):
                assert torch.equal(v, ps[k.replace(f"layers.{dst}.", f"layers.{src}.", 1)]), k
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(cs[k], ps[k])
    # a 1-layer parent-identical prefix gives identical hidden states for that layer choice
    same = build_child(parent, list(range(6)))
    ids = torch.tensor([[1, 5, 9, 22]])
    assert torch.equal(same(input_ids=ids).logits, parent(input_ids=ids).logits)
    with pytest.raises(ValueError, match="distinct indices"):
        build_child(parent, [0, 0])


def test_derive_heals_and_reloads(tmp_path, tok):
    parent = make_llama(tok, layers=6, seed=4, hidden=48)
    # a parent with sharper distributions than random init, so there is something to distil
    with torch.no_grad():
        parent.lm_head.weight.mul_(8.0)
    pdir = tmp_path / "parent"
    parent.save_pretrained(pdir)
    tok.save_pretrained(pdir)
    out = tmp_path / "child"
    cfg = DeriveConfig(parent=str(pdir), out=str(out), num_layers=2, strategy="ends", steps=30, batch_size=8,
                       seq_len=48, lr=3e-3, num_prompts=24, eval_texts=8, gen_tokens=24, checkpoint_every=10)
    card = derive(cfg)
    assert card["layers_kept"] == [0, 5]
    assert card["heldout_after"]["kd"] < 0.8 * card["heldout_before"]["kd"]
    assert card["healing_steps"] == 30 and card["healing_tokens"] > 0
    child = AutoModelForCausalLM.from_pretrained(out)
    ctok = AutoTokenizer.from_pretrained(out)
    assert child.config.num_hidden_layers == 2
    assert ctok.get_vocab() == tok.get_vocab()
    assert json.loads((out / "fedkt_derive.json").read_text())["params"] == sum(p.numel() for p in child.parameters())
    assert "layers kept: [0, 5]" in (out / "README.md").read_text()
    assert not (tmp_path / "child.partial").exists()


def test_derive_resumes_from_checkpoint(tmp_path, tok, monkeypatch):
    parent = make_llama(tok, layers=4, seed=5)
    pdir = tmp_path / "parent"
    parent.save_pretrained(pdir)
    tok.save_pretrained(pdir)
    kw = dict(parent=str(pdir), num_layers=2, steps=8, batch_size=4, seq_len=32, num_prompts=8, eval_texts=4,
              gen_tokens=12, checkpoint_every=4)
    full = derive(DeriveConfig(out=str(tmp_path / "a"), **kw))

    import fedkt.derive as d

    calls = {"n": 0}
    orig = d.kd_kl

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # inside step 6, after the step-4 checkpoint
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(d, "kd_kl", dying)
    with pytest.raises(KeyboardInterrupt):
        derive(DeriveConfig(out=str(tmp_path / "b"), **kw))
    monkeypatch.setattr(d, "kd_kl", orig)
    assert (tmp_path / "b.partial" / "state.pt").is_file()
    resumed = derive(DeriveConfig(out=str(tmp_path / "b"), **kw))
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_kd_loss"] == full["final_kd_loss"]
