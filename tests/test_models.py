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
