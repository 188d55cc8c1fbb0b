import pytest
import torch

from fedkt.config import LoraSettings
from fedkt.data.collate import collate_sft, make_sft_example
from fedkt.losses import answer_ce
from fedkt.models import (ModelLoadError, add_lora, get_adapter_state, load_adapter_state, load_model,
                          save_adapter, set_adapter_state)


def test_load_local_dir_frozen(model_dirs):
    model, tok = load_model(str(model_dirs["slm"]))
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None


def test_bad_specs():
    with pytest.raises(ModelLoadError, match="neither an existing path nor builtin"):
        load_model("/no/such/model")
    with pytest.raises(Exception, match="unknown built-in model 'nope'"):
        load_model("builtin:nope")


def test_adapter_round_trip_bit_exact(model_dirs, tmp_path):
    model, _ = load_model(str(model_dirs["slm"]))
    pm = add_lora(model, LoraSettings(r=4, alpha=8))
    state = {k: torch.randn_like(v) for k, v in get_adapter_state(pm).items()}
    save_adapter(pm, state, tmp_path / "ad")
    loaded = load_adapter_state(tmp_path / "ad")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    set_adapter_state(pm, {k: torch.zeros_like(v) for k, v in state.items()})
    set_adapter_state(pm, loaded)
    again = get_adapter_state(pm)
    assert all(torch.equal(again[k], state[k]) for k in state)
    # the saved directory is a normal peft adapter
    from peft import PeftModel

    base, _ = load_model(str(model_dirs["slm"]))
    pm2 = PeftModel.from_pretrained(base, str(tmp_path / "ad"))
    assert all(torch.equal(get_adapter_state(pm2)[k], state[k]) for k in state)


def test_adapter_state_mismatch_is_rejected(model_dirs):
    model, _ = load_model(str(model_dirs["slm"]))
    pm = add_lora(model, LoraSettings(r=4))
    with pytest.raises(ValueError, match="does not match"):
        set_adapter_state(pm, {"x": torch.zeros(1)})


def test_gradients_reach_lora_only(model_dirs, tok):
    model, _ = load_model(str(model_dirs["slm"]))
    pm = add_lora(model, LoraSettings(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    # make B non-zero so that gradients flow into A as well
    set_adapter_state(pm, {k: torch.randn_like(v) * 0.1 for k, v in get_adapter_state(pm).items()})
    batch = collate_sft([make_sft_example(tok, "Question: Which planet?\nAnswer:", " Mercury", 64)], tok.pad_token_id)
    loss = answer_ce(pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    loss.backward()
    for name, p in pm.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    lora_names = {n for n, _ in pm.named_parameters() if "lora_" in n}
    assert all(("q_proj" in n or "v_proj" in n) for n in lora_names) and len(lora_names) == 2 * 2 * 2


def _peft_get(pm):
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}


def test_cached_adapter_map_equals_peft_get_and_set(model_dirs):
    """get/set through the cached name -> parameter map give exactly peft's get/set_peft_model_state_dict,
    also after the adapter is replaced (a new adapter made active, a LoRA parameter swapped, a new wrap)."""
    from peft import LoraConfig, set_peft_model_state_dict

    from fedkt.models import _ADAPTER_MAP

    model, _ = load_model(str(model_dirs["slm"]))
    pm = add_lora(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    rand = lambda st: {k: torch.randn(v.shape, generator=g) for k, v in st.items()}  # noqa: E731
    first = get_adapter_state(pm)
    assert _ADAPTER_MAP in pm.__dict__  # the map is cached now
    assert first.keys() == _peft_get(pm).keys() and all(torch.equal(first[k], _peft_get(pm)[k]) for k in first)
    for _ in range(2):  # set via the cache == set via peft, read back both ways
        state = rand(first)
        set_adapter_state(pm, state)
        got, ref = get_adapter_state(pm), _peft_get(pm)
        assert all(torch.equal(got[k], state[k]) and torch.equal(ref[k], state[k]) for k in state)
        other = rand(first)
        set_peft_model_state_dict(pm, other)  # peft writes; the cached get sees it
        assert all(torch.equal(get_adapter_state(pm)[k], other[k]) for k in other)
    # the returned tensors are copies: changing them does not touch the model
    got = get_adapter_state(pm)
    k0 = next(iter(got))
    got[k0].add_(1.0)
    assert not torch.equal(get_adapter_state(pm)[k0], got[k0])
    # a LoRA parameter replaced by a new one (a reload that rebuilds the module): the map is rebuilt
    name = next(n for n, _ in pm.named_parameters() if "lora_A" in n)
    mod, _, attr = name.rpartition(".")
    sub = pm.get_submodule(mod)
    new = torch.nn.Parameter(torch.full_like(getattr(sub, attr), 3.0))
    setattr(sub, attr, new)
    ref = _peft_get(pm)
    got = get_adapter_state(pm)
    assert all(torch.equal(got[k], ref[k]) for k in ref) and any(torch.equal(v, torch.full_like(v, 3.0))
                                                                 for v in got.values())
    state = rand(first)
    set_adapter_state(pm, state)
    assert torch.equal(new.detach(), state[next(k for k in state if torch.equal(_peft_get(pm)[k], new.detach()))])
    assert all(torch.equal(_peft_get(pm)[k], state[k]) for k in state)
    # a second adapter added and made active (peft's state dict keeps naming the "default" one): same as peft
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"], task_type="CAUSAL_LM"))
    pm.set_adapter("other")
    ref = _peft_get(pm)
    got = get_adapter_state(pm)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    state = rand(got)
    set_adapter_state(pm, state)
    assert all(torch.equal(_peft_get(pm)[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="does not match"):
        set_adapter_state(pm, {k.replace("q_proj", "k_proj"): v for k, v in state.items()})
    # a wrong shape under the right key is refused (copy_ would broadcast it silently)
    bad = dict(state)
    bad[k0 := next(iter(bad))] = torch.zeros(1, bad[k0].shape[-1])
    with pytest.raises(ValueError, match="shape"):
        set_adapter_state(pm, bad)
    # a fresh wrap of a reloaded model has its own map
    model2, _ = load_model(str(model_dirs["slm"]))
    pm2 = add_lora(model2, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    state = rand(first)
    set_adapter_state(pm2, state)
    assert all(torch.equal(_peft_get(pm2)[k], state[k]) for k in state)
    assert pm2.__dict__[_ADAPTER_MAP][1].keys() == first.keys()
