"""fedkt plan: exact counts against loaded models, hand-computed steps and bytes, the paper configs plan."""

import json
from pathlib import Path

import pytest
import torch

from fedkt.config import ConfigError, LoraSettings
from fedkt.registry import load_config
from fedkt.models import adapter_nbytes, count_parameters, load_lora_model
from fedkt.plan import Options, model_facts, plan, sft_steps
from fedkt.plan_archs import KNOWN, known

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "examples" / "paper").glob("*.toml"))


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "v_proj", "gate_proj"]])
def test_counts_equal_the_loaded_model_and_peft_adapter(model_dirs, targets):
    lora = LoraSettings(r=4, target_modules=targets)
    for role, d in model_dirs.items():
        facts = model_facts(role, str(d), lora)
        loaded = load_lora_model(str(d), "float32", lora, seed=0)
        real_trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
        assert facts.params == loaded.base_params == count_parameters(loaded.model.get_base_model()) - real_trainable
        assert facts.trainable == real_trainable == sum(v.numel() for v in loaded.init_adapter.values())
        assert facts.adapter_bytes == adapter_nbytes(loaded.init_adapter)
        assert facts.arch.layers == loaded.model.config.num_hidden_layers


def test_tiny_llama_counts_by_hand(model_dirs):
    # slm: 2 layers, h=32, i=64, 4 heads (head_dim 8), 2 kv heads (kv dim 16); LoRA r=4 on q,k,v,o
    f = model_facts("slm", str(model_dirs["slm"]), LoraSettings(r=4))
    per_layer = 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))  # r·(in + out) per target
    assert f.trainable == 2 * per_layer == 1792
    assert f.adapter_bytes == 4 * 1792


PUBLISHED = {  # parameter counts of the public checkpoints (tied embeddings counted once)
    "openai-community/gpt2": 124_439_808, "openai-community/gpt2-large": 774_030_080,
    "facebook/opt-1.3b": 1_315_758_080, "facebook/opt-6.7b": 6_658_473_984,
    "princeton-nlp/Sheared-LLaMA-1.3B": 1_345_423_360, "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "Qwen/Qwen2-0.5B": 494_032_768, "Qwen/Qwen2-1.5B": 1_543_714_304, "Qwen/Qwen2-7B-Instruct": 7_615_616_512,
    "builtin:smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_known_architectures_count_their_published_parameters(name):
    lora = LoraSettings(target_modules=["c_attn"] if "gpt2" in name else ["q_proj", "v_proj"])
    assert model_facts("x", name if name.startswith("builtin:") else "hf:" + name, lora).params == PUBLISHED[name]
    assert known(name) is not None and "source" in KNOWN[name]


def test_lora_on_gpt2_and_llama7b_by_hand():
    g = model_facts("llm", "hf:gpt2-large", LoraSettings(r=8, target_modules=["c_attn"]))
    assert g.trainable == 36 * 8 * (1280 + 3 * 1280)  # c_attn: 1280 -> 3840
    ll = model_facts("llm", "hf:meta-llama/Llama-2-7b-hf", LoraSettings(r=16, target_modules=["q_proj", "v_proj"]))
    assert ll.trainable == 32 * 2 * 16 * (4096 + 4096) == 8_388_608


def test_unknown_model_and_bad_targets_are_named():
    with pytest.raises(ConfigError, match="no-such/model.*config.json"):
        model_facts("slm", "hf:no-such/model", LoraSettings())
    with pytest.raises(ConfigError, match="target_modules.*gpt2"):
        model_facts("slm", "hf:gpt2", LoraSettings(target_modules=["q_proj"]))


def test_sft_steps_match_the_training_loop():
    from fedkt.config import TrainConfig
    from fedkt.train import batch_order
    import math

    for n, b, e, acc in ((64, 8, 1.0, 1), (65, 8, 1.0, 1), (30, 8, 2.5, 2), (5, 8, 0.5, 1)):
        t = TrainConfig(batch_size=b, epochs=e, grad_accum=acc)
        assert sft_steps(n, t, e) == math.ceil(len(batch_order(n, b, e, 0)) / acc)
    assert sft_steps(1000, TrainConfig(max_steps=7), 1.0) == 7


def write_cfg(tmp_path, model_dirs, data_dir, extra=""):
    p = tmp_path / "exp.toml"
    p.write_text(f"""methods = ["zero_shot", "fedavg", "fedcollm", "standalone"]
[model]
slm = "{model_dirs['slm']}"
llm = "{model_dirs['llm']}"
[lora]
r = 4
[data]
dir = "{data_dir}"
[partition]
num_clients = 4
aux_size = 16
[train]
batch_size = 8
epochs = 2.0
[federation]
rounds = 3
{extra}
[fedcollm]
kd_steps = 5
""")
    return p


def test_plan_steps_and_bytes_by_hand(tmp_path, model_dirs, data_dir):
    cfg = load_config(write_cfg(tmp_path, model_dirs, data_dir))
    p = plan(cfg, Options.from_config(cfg))
    assert p["data"] == {"source": "loaded", "clients": [12, 12, 12, 12], "aux": 16}  # 64 - 16 over 4
    slm = p["models"]["slm"]
    rows = {(m, r["role"]): r for m, rs in p["methods"].items() for r in rs}
    fit = rows[("fedavg", "client SLM")]
    assert fit["steps_per_round"] == 4 and fit["steps_total"] == 4 * 4 * 3  # ceil(12/8)·2 epochs, 4 clients, 3 rounds
    assert fit["per_client_steps"] == [4, 4, 4, 4]
    assert fit["down_bytes_per_round"] == fit["up_bytes_per_round"] == slm["adapter_bytes"] == 4 * slm["trainable"]
    assert rows[("standalone", "client SLM")]["steps_total"] == 4 * 2 * 6  # 4 clients, ceil(12/8) batches, 2·3 epochs
    assert rows[("fedcollm", "server LLM")]["steps_total"] == 15
    secure = load_config(write_cfg(tmp_path, model_dirs, data_dir, "secure_aggregation = true"))
    up = plan(secure, Options.from_config(secure))["methods"]["fedavg"][0]["up_bytes_per_round"]
    assert up == 8 * slm["trainable"]  # masked 64-bit integers


def test_dtype_4bit_and_checkpointing_shrink_the_plan(tmp_path, model_dirs, data_dir):
    cfg = load_config(write_cfg(tmp_path, model_dirs, data_dir))
    base = plan(cfg, Options.from_config(cfg))
    bf16 = plan(cfg, Options.from_config(cfg, dtype="bf16"))
    q4 = plan(cfg, Options.from_config(cfg, dtype="bf16", load_in_4bit=True))
    ck = plan(cfg, Options.from_config(cfg, gradient_checkpointing=True))
    llm = base["models"]["llm"]
    assert bf16["models"]["llm"]["weights_bytes"] == 2 * llm["params"] == llm["weights_bytes"] // 2
    assert q4["models"]["llm"]["weights_bytes"] < bf16["models"]["llm"]["weights_bytes"]
    assert q4["models"]["slm"]["weights_bytes"] == bf16["models"]["slm"]["weights_bytes"]  # 4-bit: the server LLM only
    act = lambda p: p["methods"]["fedavg"][0]["peak_parts"]["activations"]  # noqa: E731
    assert act(ck) < act(base)



def test_bf16_checked_eval_plans_its_bf16_copy(tmp_path, model_dirs, data_dir):
    """eval.precision = "bf16-checked" holds a bf16 copy of the decoder's linear layers while it scores: the
    server rows that only evaluate grow by exactly 2 bytes per such parameter; a bf16 model makes no copy."""
    cfg = load_config(write_cfg(tmp_path, model_dirs, data_dir))
    checked = load_config(write_cfg(tmp_path, model_dirs, data_dir), overrides=["eval.precision=bf16-checked"])
    rows = lambda c, **kw: {(m, r["role"]): r["peak_parts"] for m, rs in plan(c, Options.from_config(c, **kw))[  # noqa: E731
        "methods"].items() for r in rs}
    base, more = rows(cfg), rows(checked)
    zs = ("zero_shot", "server SLM")
    from fedkt.models import load_model

    m, _ = load_model(str(model_dirs["slm"]))
    linears = sum(x.weight.numel() + (x.bias.numel() if x.bias is not None else 0) for x in m.model.modules()
                  if isinstance(x, torch.nn.Linear))
    assert more[zs]["activations"] - base[zs]["activations"] == 2 * linears > 0
    assert rows(checked, dtype="bf16")[zs] == rows(cfg, dtype="bf16")[zs]


@pytest.mark.parametrize("path", PAPER, ids=[p.name for p in PAPER])
def test_paper_configs_validate_and_plan(path):
    cfg = load_config(path)
    p = plan(cfg, Options.from_config(cfg), str(path))
    assert p["options"]["dtype"] == "bf16"
    for role, m in p["models"].items():
        if not m.get("served"):
            assert m["params"] > 1e8 and m["trainable"] > 0 and m["weights_bytes"] == 2 * m["params"]
    assert all(rows for rows in p["methods"].values())
    json.dumps(p)


def test_paper_set_covers_the_three_fedcollm_pairs_and_a_7b_teacher():
    pairs = {(c.model.slm, c.model.llm) for c in map(load_config, PAPER) if "fedcollm" in c.methods}
    assert pairs == {("hf:openai-community/gpt2", "hf:openai-community/gpt2-large"),
                     ("hf:facebook/opt-1.3b", "hf:facebook/opt-6.7b"),
                     ("hf:princeton-nlp/Sheared-LLaMA-1.3B", "hf:meta-llama/Llama-2-7b-hf")}
    teachers = {c.model.llm for c in map(load_config, PAPER) if {"fedcot", "fdkt"} & set(c.methods)}
    assert any(t.startswith("openai:") for t in teachers) and any(t.startswith("hf:") for t in teachers)


def test_cli_plan_json(tmp_path, model_dirs, data_dir):
    from typer.testing import CliRunner

    from fedkt.cli import app

    r = CliRunner().invoke(app, ["plan", str(write_cfg(tmp_path, model_dirs, data_dir)), "--json", "--dtype", "bf16",
                                 "--gradient-checkpointing", "--seq-len", "40"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert p["options"]["dtype"] == "bf16" and p["options"]["gradient_checkpointing"] and p["options"]["seq_len"] == 40
    r = CliRunner().invoke(app, ["plan", str(write_cfg(tmp_path, model_dirs, data_dir))])
    assert "| fedcollm | server LLM | 5 | 15 |" in r.output


def _saved_bytes(model, step) -> tuple[int, object]:
    """Freeze ``model``, wrap it in a rank-4 LoRA adapter (train mode) and run ``step(lora_model)`` under a
    saved-tensor hook: the bytes autograd saves for the backward, weights (base and adapter) left out, and
    what ``step`` returned."""
    import torch

    from fedkt.models import add_lora

    for p in model.parameters():
        p.requires_grad_(False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model = add_lora(model, LoraSettings(r=4))
    model.train()
    weights |= {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step(model)
    return sum(saved.values()), out


def test_activation_formula_tracks_what_autograd_saves(tok):
    """The per-token, per-layer count of the memory model against the bytes autograd really saves for a LoRA
    SFT step of a tiny Llama (weights and the log-softmax taken out), within 15%."""
    import torch

    from conftest import make_llama
    from fedkt.losses import answer_ce
    from fedkt.plan_memory import Arch, activation_bytes

    B, S = 4, 40
    ids = torch.randint(0, len(tok), (B, S))

    def step(m):
        logits = m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        answer_ce(logits, ids)
        return B * (S - 1) * logits.shape[-1] * 4  # the log-softmax's saved copy, taken out below

    model = make_llama(tok, layers=3, hidden=64)
    total, lsm_bytes = _saved_bytes(model, step)
    measured = total - lsm_bytes
    arch = Arch.from_hf(model.config)
    formula = activation_bytes(arch, B * S, 4, False, 0)
    print(f"saved {measured} B, formula {formula} B, ratio {measured / formula:.3f}")
    assert 0.85 < measured / formula < 1.15, (measured, formula)


def test_answer_only_sft_logits_are_planned_at_the_supervised_positions(tok):
    """fedkt's SFT (``train.answer_loss``) runs the LM head on the answer positions only: what autograd saves
    for a step follows ``activation_bytes(..., logit_tokens=B·A)`` (one fp32 [B·A × vocab] copy saved, the
    log-softmax), not the every-token count, on a vocabulary big enough for the logits to dominate."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedkt.data.collate import IGNORE
    from fedkt.plan_memory import Arch, activation_bytes
    from fedkt.train import answer_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    B, S, A = 4, 40, 3
    ids = torch.randint(0, 8192, (B, S))
    labels = torch.full((B, S), IGNORE)
    labels[:, -A:] = ids[:, -A:]  # A supervised tokens per row: A positions of labels[:, 1:] each
    measured, _ = _saved_bytes(model, lambda m: answer_loss(
        m, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}))
    arch = Arch.from_hf(model.config)
    answers, every = activation_bytes(arch, B * S, 4, False, 1, B * A), activation_bytes(arch, B * S, 4, False, 1)
    print(f"saved {measured} B, answer positions {answers} B, every token {every} B")
    assert 0.85 < measured / answers < 1.15, (measured, answers)
    assert measured / every < 0.4


def test_plan_reads_the_answer_length_and_counts_sft_logits_there(tmp_path, model_dirs, data_dir):
    """The plan's answer length is the most supervised positions of one training example (what answer_loss
    reads, from collate_sft's labels); FedAvg's client row counts the logits at batch × that, FedProx's (full
    logits) at every token, and ``--seq-len`` without the data leaves every token counted."""
    from transformers import AutoTokenizer

    from fedkt.data.collate import IGNORE, collate_sft
    from fedkt.plan import client_data
    from fedkt.plan_memory import activation_bytes
    from fedkt.train import tokenize_examples

    cfg = load_config(write_cfg(tmp_path, model_dirs, data_dir), ['methods=["fedavg", "fedprox"]'])
    p = plan(cfg, Options.from_config(cfg))
    clients, aux, _ = client_data(cfg)
    tok = AutoTokenizer.from_pretrained(model_dirs["slm"])
    batch = collate_sft(tokenize_examples(tok, [e for c in clients for e in c] + aux, cfg.train.max_length),
                        tok.pad_token_id)
    A = int((batch["labels"][:, 1:] != IGNORE).sum(1).max())
    assert p["options"]["answer_len"] == A and 0 < A < p["options"]["seq_len"]
    arch = model_facts("slm", str(model_dirs["slm"]), cfg.lora).arch
    B, S = cfg.train.batch_size, p["options"]["seq_len"]
    act = {m: p["methods"][m][0]["peak_parts"]["activations"] for m in ("fedavg", "fedprox")}
    evals = p["methods"]["fedavg"][1]["peak_parts"]["activations"]
    assert act["fedavg"] == max(activation_bytes(arch, B * S, 4, False, 4, B * A), evals)
    assert act["fedprox"] == max(activation_bytes(arch, B * S, 4, False, 4), evals) > act["fedavg"]
    kd = load_config(write_cfg(tmp_path, model_dirs, data_dir), ['methods=["fedcollm"]', 'fedcollm.kd_tokens="answer"',
                                                                  "fedcollm.batch_size=4"])
    kd_rows = plan(kd, Options.from_config(kd))["methods"]["fedcollm"]
    kd_S = p["options"]["aux_seq_len"]
    assert kd_rows[1]["role"] == "server SLM" and kd_rows[1]["peak_parts"]["activations"] == max(
        activation_bytes(arch, 4 * kd_S, 4, False, 6, 4 * A), evals)  # KD on the answer positions only
    fixed = plan(cfg, Options.from_config(cfg, seq_len=S))
    assert fixed["options"]["answer_len"] == 0
    assert fixed["methods"]["fedavg"][0]["peak_parts"]["activations"] == act["fedprox"]


def test_methods_outside_the_table_are_planned_as_fedavg_or_noted(tmp_path, model_dirs, data_dir):
    from fedkt import registry
    from fedkt.algorithms.fedavg import FedAvg
    from fedkt.registry import MethodSpec

    registry.register(MethodSpec(name="toyround", label="T", summary="t", algorithm=FedAvg))
    registry.register(MethodSpec(name="toyshot", label="S", summary="s", run=lambda server: None))
    try:
        p = write_cfg(tmp_path, model_dirs, data_dir)
        cfg = load_config(p, ['methods=["fedavg", "toyround", "toyshot"]'])
        out = plan(cfg, Options.from_config(cfg))
    finally:
        registry._REGISTRY.pop("toyround")
        registry._REGISTRY.pop("toyshot")
    assert out["methods"]["toyround"] == out["methods"]["fedavg"] and out["methods"]["toyshot"] == []
    assert any(n.startswith("toyround: not in fedkt.plan_methods; planned as FedAvg") for n in out["notes"])
    assert any(n.startswith("toyshot: not in fedkt.plan_methods; not planned") for n in out["notes"])
