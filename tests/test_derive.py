"""derive-slm on a tiny random parent: exact layer copy, same tokenizer, healing helps, plain reload."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedkt.derive import DeriveConfig, derive
from fedkt.derived_model import build_child, select_layers

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


def test_block_influence_and_importance_selection(tok):
    from fedkt.derive import block_influence

    parent = make_llama(tok, layers=4, seed=6)
    texts = ["the cat sat on the mat", "a b c d e f g"]
    bi = block_influence(parent, tok, texts, seq_len=16)
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    hs = parent(**enc, output_hidden_states=True).hidden_states
    m = enc["attention_mask"].bool()
    want = [1 - torch.nn.functional.cosine_similarity(hs[i][m], hs[i + 1][m], dim=-1).mean().item() for i in range(4)]
    assert bi == pytest.approx(want, abs=1e-6)
    assert select_layers(4, 2, "importance", [0.1, 0.5, 0.2, 0.9]) == [1, 3]
    assert select_layers(4, 2, "importance", [0.5, 0.5, 0.5, 0.1]) == [0, 1]   # ties: lower index
    with pytest.raises(ValueError, match="one importance score per parent block"):
        select_layers(4, 2, "importance")


def test_delta_merge_is_exact_integer_arithmetic():
    from fedkt.derive_delta import merged_weight, quantise

    g = torch.Generator().manual_seed(0)
    a, b, w = torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g) * 1e-2, torch.randn(4, 5, generator=g)
    q = quantise(a, b)
    assert q["Aq"].dtype == torch.int16 and q["Aq"].abs().max() == 32767 and q["Bq"].abs().max() == 32767
    # hand-computed: sum over the rank of integer products, then the scales, in float64
    want = w.double().clone()
    for o in range(4):
        for i in range(5):
            s = sum(int(q["Bq"][o, k]) * int(q["Aq"][k, i]) for k in range(3))
            want[o, i] += s * float(q["sB"][o]) * float(q["sA"][i])
    assert torch.equal(merged_weight(w, q), want.float())
    assert torch.allclose(merged_weight(w, q), w + b @ a, atol=1e-5)   # quantisation error only


def test_rank_delta_derive_rebuilds_bit_exact(tmp_path, tok):
    from fedkt.derived_model import DELTA_FILE, RebuildError, rebuild
    from fedkt.models import load_model
    from fedkt.derive_delta import load_delta, state_sha256

    parent = make_llama(tok, layers=4, seed=7, hidden=48)
    with torch.no_grad():
        parent.lm_head.weight.mul_(8.0)
    pdir = tmp_path / "parent"
    parent.save_pretrained(pdir)
    tok.save_pretrained(pdir)
    out = tmp_path / "child"
    card = derive(DeriveConfig(parent=str(pdir), out=str(out), num_layers=2, strategy="importance", rank=4,
                               steps=20, batch_size=8, seq_len=48, lr=3e-3, num_prompts=16, eval_texts=8,
                               gen_tokens=16, checkpoint_every=10))
    assert card["rank"] == 4 and len(card["block_influence"]) == 4
    assert card["layers_kept"] == select_layers(4, 2, "importance", card["block_influence"])
    assert card["heldout_after"]["kd"] < card["heldout_before"]["kd"]
    child = AutoModelForCausalLM.from_pretrained(out)
    assert state_sha256(child) == card["sha256"]
    delta = load_delta(out / DELTA_FILE)
    # only the factors of the kept blocks' linear layers and their norms ship: 7 linears x 2 blocks x 4 tensors
    assert sum(k.endswith(".Aq") for k in delta) == 14 and all(k.startswith("model.layers.") for k in delta)
    assert card["delta_bytes"] == sum(v.numel() * v.element_size() for v in delta.values())
    # a rebuild from the card and delta alone is the same model, bit for bit
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    for f in ("fedkt_derive.json", DELTA_FILE):
        (recipe / f).write_bytes((out / f).read_bytes())
    rebuild(recipe, tmp_path / "again", load_model)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(again[k], v) for k, v in child.state_dict().items())
    # a different parent is refused by hash
    bad = json.loads((recipe / "fedkt_derive.json").read_text())
    bad["parent_sha256"] = "0" * 64
    (recipe / "fedkt_derive.json").write_text(json.dumps(bad))
    with pytest.raises(RebuildError, match="differ from the 0000"):
        rebuild(recipe, tmp_path / "bad", load_model)


def test_derive_config_validates():
    from fedkt.config import ConfigError

    with pytest.raises(ConfigError, match="rank must be >= 0"):
        DeriveConfig(rank=-1)
    with pytest.raises(ConfigError, match=r"task_fraction must be in \[0, 1\)"):
        DeriveConfig(task_fraction=1.0)
    with pytest.raises(ConfigError, match="num_layers must be > 0"):
        DeriveConfig(num_layers=0)
    assert DeriveConfig(steps=0).steps == 0


def test_bundled_default_slm_recipe_is_complete_and_consistent():
    """The card + delta that builtin:smollm2-slm is rebuilt from: every kept block has its 7 linear
    deltas (int16 factors of the card's rank, fp32 scales) and its 2 norms, nothing else, and the file is
    the size the card says."""
    import json

    from safetensors import safe_open

    from fedkt.builtin_models import BUNDLED_SLM
    from fedkt.derive import DEFAULT_SLM
    from fedkt.derived_model import DELTA_FILE

    card = json.loads((BUNDLED_SLM / "fedkt_derive.json").read_text())
    assert card["parent"] == DEFAULT_SLM.parent and card["rank"] == DEFAULT_SLM.rank
    assert card["healing_steps"] == DEFAULT_SLM.steps and len(card["layers_kept"]) == DEFAULT_SLM.num_layers
    assert card["params"] <= 0.65 * card["parent_params"]
    assert (BUNDLED_SLM / DELTA_FILE).stat().st_size == pytest.approx(card["delta_bytes"], rel=0.02)
    linears = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    want = set()
    for i in range(len(card["layers_kept"])):
        want |= {f"model.layers.{i}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
        want |= {f"model.layers.{i}.{m}.{t}" for m in linears for t in ("Aq", "Bq", "sA", "sB")}
    with safe_open(str(BUNDLED_SLM / DELTA_FILE), "pt") as f:
        assert set(f.keys()) == want
        a, b = f.get_tensor("model.layers.0.mlp.down_proj.Aq"), f.get_tensor("model.layers.0.mlp.down_proj.Bq")
        assert a.dtype == b.dtype == torch.int16 and a.shape[0] == b.shape[1] == card["rank"]
        assert f.get_tensor("model.layers.0.mlp.down_proj.sA").dtype == torch.float32


def test_bundled_default_slm_rebuilds_to_the_measured_weights(tmp_path, monkeypatch):
    """Rebuild builtin:smollm2-slm from the real parent and check the sha256 of its weights against the
    card (rebuild raises otherwise). Needs SmolLM2-135M-Instruct in the fedkt cache (`fedkt models --fetch
    smollm2-135m`); skipped where it is not (tests never download)."""
    import json

    from fedkt.builtin_models import BUNDLED_SLM, cache_dir
    from fedkt.derived_model import rebuild
    from fedkt.models import load_model

    if not (cache_dir() / "smollm2-135m" / "model.safetensors").is_file():
        pytest.skip("SmolLM2-135M-Instruct not in the fedkt cache")
    card = rebuild(BUNDLED_SLM, tmp_path / "slm", load_model)
    assert card["sha256"] == json.loads((BUNDLED_SLM / "fedkt_derive.json").read_text())["sha256"]
    assert json.loads((tmp_path / "slm" / "config.json").read_text())["num_hidden_layers"] == len(card["layers_kept"])
