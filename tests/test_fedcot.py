"""FedCoT: the multi-task loss by hand, the protocol end to end through the registry, privacy canaries."""

import json
import math

import pytest
import torch

from fedkt.algorithms.fedcot import (FedCoTConfig, collate_multitask, explain_prompt, multitask_data, multitask_loss,
                                     render_question)
from fedkt.config import ConfigError, LoraSettings
from fedkt.registry import load_config
from fedkt.data.collate import collate_sft
from fedkt.data.tasks import Example
from fedkt.losses import answer_ce
from fedkt.models import add_lora, load_model
from fedkt.experiment import run_experiment

from test_runs import interrupt_and_resume, tiny_config

CANARY = "ZQX canary 7731"


def ex(i=0):
    return Example(task="arc_easy", id=str(i), question=f"Which gas do plants take in? ({i})",
                   choices=("oxygen", "carbon dioxide", "helium"), answer=1, target="carbon dioxide")


def test_prompts():
    assert render_question(ex()) == ("Question: Which gas do plants take in? (0)\n"
                                     "Choices: (A) oxygen (B) carbon dioxide (C) helium")
    # issue 22 §3 (changed on purpose): one input for both tasks, "Explain:" + the label task's prompt
    assert explain_prompt(ex()) == "Explain:\nQuestion: Which gas do plants take in? (0)\nAnswer:"


def test_multitask_loss_equals_hand_computed(model_dirs):
    model, tok = load_model(str(model_dirs["slm"]))
    model = add_lora(model, LoraSettings(r=4, dropout=0.0))
    exs = [ex(0), ex(1)]
    rats = ["plants use carbon dioxide", "photosynthesis takes in carbon dioxide so B"]
    items = multitask_data(tok, exs, rats, 128)
    batch = collate_multitask(items, tok.pad_token_id)
    with torch.no_grad():
        def ce(b):
            return answer_ce(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])

        ce_e = ce(collate_sft([e for e, _ in items], tok.pad_token_id)).item()
        ce_p = ce(collate_sft([p for _, p in items], tok.pad_token_id)).item()
        for alpha in (0.0, 0.3, 0.5, 1.0):
            assert multitask_loss(model, batch, alpha).item() == pytest.approx(alpha * ce_e + (1 - alpha) * ce_p,
                                                                                rel=1e-6)
    assert ce_e != pytest.approx(ce_p)
    # the rationale task supervises exactly the rationale (+ EOS) tokens after the explain prompt
    e0 = items[0][0]
    sup = [t for t, lab in zip(e0.input_ids, e0.labels) if lab != -100]
    assert tok.decode(sup[:-1]) == " plants use carbon dioxide" and sup[-1] == tok.eos_token_id


def test_config_validation():
    with pytest.raises(ConfigError, match=r"fedcot.alpha must be in \[0, 1\], got 1.5"):
        load_config(None, ["fedcot.alpha=1.5"])
    with pytest.raises(ConfigError, match=r"fedcot.epsilon must be > 0"):
        load_config(None, ["fedcot.epsilon=0"])
    assert math.isinf(load_config(None, ["fedcot.epsilon=inf"]).section(FedCoTConfig).epsilon)


def fedcot_config(tmp_path, model_dirs, data_dir, **extra):
    base = {"fedcot.kit_neighbors": 8, "fedcot.rationale_tokens": 6, "fedcot.decode_tokens": 6,
            "fedcot.epsilon": 2.0, "federation.rounds": 2}
    base.update(extra)
    return tiny_config(tmp_path, model_dirs, data_dir, ["fedcot"], llm=True, **base)[0]


@pytest.fixture()
def recorded(monkeypatch, tmp_path):
    """Every reply a client sends (the server-bound payloads), as the ledger meters them."""
    from fedkt.federation.local import LocalFederation

    monkeypatch.setenv("FEDKT_CACHE", str(tmp_path / "cache"))
    up = []
    orig = LocalFederation._deliver

    def deliver(self, method, payloads, round):
        out = orig(self, method, payloads, round)
        up.extend((method, cid, d.reply) for cid, d in out.items() if d.reply is not None)
        return out

    monkeypatch.setattr(LocalFederation, "_deliver", deliver)
    return up


def plant_canary(data_dir):
    f = data_dir / "arc_easy" / "train.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    for r in rows[:20]:
        r["question"] = f"{r['question']} {CANARY}"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))


def canaries_held_by_clients(cfg, tmp_path):
    from fedkt.simulation import Simulation

    return sum(CANARY in e.question for c in Simulation(cfg, tmp_path / "sim").clients_data for e in c)


def scan(up):
    from fedkt.privacy.audit import scan_for_canaries

    return scan_for_canaries([{"texts": m.texts, "meta": m.meta} for _, _, m in up], [CANARY])


def test_fedcot_end_to_end_and_canaries_never_leave(tmp_path, model_dirs, data_dir, recorded):
    plant_canary(data_dir)
    cfg = fedcot_config(tmp_path, model_dirs, data_dir, **{"fedcot.client_epsilons": "[1.0, 2.0, 4.0]"})
    out = run_experiment(cfg, tmp_path / "r")
    res = out["methods"]["fedcot"]
    assert [e["round"] for e in res["per_round"]] == [1, 2] and res["slm"]["arc_easy"]["n"] == 12
    privacy = res["per_round"][0]["privacy"]
    assert [privacy[c]["epsilon_per_token"] for c in ("client0", "client1", "client2")] == [1.0, 2.0, 4.0]
    # no side channel: how many tokens changed stays on the client (0 would say "this is the original")
    assert all("changed_fraction" not in p and p["randomness"] == "simulation" for p in privacy.values())
    assert "privacy" not in res["per_round"][1]  # nothing is perturbed (or spent) again in round 2
    encoded = [m for method, _, m in recorded if method == "encode"]
    assert len(encoded) == 3 and sum(len(m.texts) for m in encoded) == sum(out["data"]["clients"])
    from fedkt.algorithms.fedcot import render_question
    from fedkt.simulation import Simulation

    originals = {render_question(e) for c in Simulation(cfg, tmp_path / "sim2").clients_data for e in c}
    sent = [t for m in encoded for t in m.texts]
    assert sum(t not in originals for t in sent) / len(sent) > 0.9  # perturbed at ε ≤ 4 per token
    assert canaries_held_by_clients(cfg, tmp_path) > 10 and scan(recorded) == []
    # round 2 re-trains on the kept rationales: no texts either way; the paper's mode (the default): the
    # clients keep their SLMs, no adapter leaves any client, each evaluates its own and sends the metrics
    assert all(not m.texts for method, _, m in recorded if method == "decode_train")
    assert all(not m.tensors for _, _, m in recorded)
    last = res["per_round"][-1]
    assert set(last["per_client"]) == {"client0", "client1", "client2"}
    assert res["slm"]["arc_easy"]["acc"] == pytest.approx(
        sum(p["arc_easy"]["acc"] for p in last["per_client"].values()) / 3)
    assert set(res["timings"]) == {"encode_s", "generate_s", "client_train_s", "aggregate_s", "eval_s"}


def test_adaptive_mechanism_runs_end_to_end_with_one_epsilon_per_prompt(tmp_path, model_dirs, data_dir, recorded):
    """fedcot.mechanism = "adaptive" in simulation: every prompt of a client costs the same ε·n̄ (its mean
    and max agree), the client's token cap follows the experiment, and training and evaluation complete."""
    cfg = fedcot_config(tmp_path, model_dirs, data_dir, **{"fedcot.mechanism": "adaptive",
                                                           "federation.rounds": 1})
    res = run_experiment(cfg, tmp_path / "r")["methods"]["fedcot"]
    privacy = res["per_round"][0]["privacy"]
    for p in privacy.values():
        assert p["prompt_epsilon_max"] == pytest.approx(p["prompt_epsilon_mean"])
        assert p["prompt_epsilon_mean"] > 0 and p["epsilon_per_token"] == 2.0
    assert res["slm"]["arc_easy"]["n"] == 12


def test_canary_scan_catches_an_unprotected_run(tmp_path, model_dirs, data_dir, recorded):
    """Positive control: with ε = ∞ the prompts go out verbatim, and the scan must see the canary."""
    plant_canary(data_dir)
    cfg = fedcot_config(tmp_path, model_dirs, data_dir, **{"fedcot.epsilon": "inf", "federation.rounds": 1})
    run_experiment(cfg, tmp_path / "r")
    assert len(scan(recorded)) == canaries_held_by_clients(cfg, tmp_path) > 10


def test_empty_rationale_ablation_and_resume(tmp_path, model_dirs, data_dir, monkeypatch, recorded):
    from fedkt.models import load_adapter_state

    cfg = fedcot_config(tmp_path, model_dirs, data_dir, **{"fedcot.empty_rationales": "true",
                                                            "federation.rounds": 3})
    full = run_experiment(cfg, tmp_path / "full")["methods"]["fedcot"]
    assert full["per_round"][0]["generation"]["empty"] == full["per_round"][0]["generation"]["prompts"]

    resumed = interrupt_and_resume(cfg, tmp_path / "cut", monkeypatch, exc=KeyboardInterrupt)["methods"]["fedcot"]
    a = load_adapter_state(tmp_path / "full" / "adapters" / "fedcot" / "slm")
    b = load_adapter_state(tmp_path / "cut" / "adapters" / "fedcot" / "slm")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["per_round"] == full["per_round"]


def test_report_has_privacy_and_audit_tables(tmp_path, model_dirs, data_dir, recorded):
    # the shared variant: FedAvg of the clients' adapters (the simulation's policy allows it in the clear)
    cfg = fedcot_config(tmp_path, model_dirs, data_dir, **{"federation.rounds": 1, "fedcot.share_adapters": "true"})
    out = run_experiment(cfg, tmp_path / "r")
    assert all(m.tensors and "metrics" not in m.meta for method, _, m in recorded if method == "decode_train")
    audit = out["methods"]["fedcot"]["per_round"][0]["audit"]
    assert [r["epsilon"] for r in audit] == [1.0, 2.0, 3.0, 6.0, 10.0, math.inf]
    assert audit[-1]["unchanged"] == 1.0 and audit[0]["unchanged"] < audit[-2]["unchanged"]
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## Privacy: FedCoT" in report and "| client0 | 2 |" in report and "recovered: MAP" in report
    assert "Randomness: simulation: derived from the experiment seed (simulation): known to the server" in report
    attack = out["methods"]["fedcot"]["per_round"][0]["attack"]  # the contextual attack on a few public prompts
    assert {3.0, 6.0, 10.0} <= {r["epsilon"] for r in attack} and all(not math.isinf(r["epsilon"]) for r in attack)
    assert all(0 <= r["token_recovery"]["contextual"] <= 1 for r in attack) and attack[0]["n_texts"] > 0
    assert "Contextual attack on" in report and "contextual (LM beam): tokens / canaries" in report


from test_text_generators import stub  # noqa: E402,F401 - the stub OpenAI-compatible server fixture


def test_fedcot_with_an_openai_compatible_llm(tmp_path, model_dirs, data_dir, recorded, stub):
    """The server LLM behind an OpenAI-compatible server (vLLM, llama.cpp): only perturbed prompts reach it."""
    plant_canary(data_dir)
    cfg = fedcot_config(tmp_path, model_dirs, data_dir, **{
        "model.llm": f'"openai:{stub.base}#stub-model"', "fedcot.kit_model": f'"{model_dirs["llm"]}"',
        "federation.rounds": 1})
    res = run_experiment(cfg, tmp_path / "r")["methods"]["fedcot"]
    sent = [p for r in stub.requests if r["body"] for p in r["body"]["prompt"]]
    assert len(sent) == res["per_round"][0]["generation"]["prompts"] > 0
    assert all(CANARY not in p for p in sent) and all(r["body"]["model"] == "stub-model" for r in stub.requests)
    assert res["slm"]["arc_easy"]["n"] == 12
