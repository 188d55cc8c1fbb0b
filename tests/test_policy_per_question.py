"""Per-question correctness (``meta.correct``) leaves a client only where the client's own policy allows it
(``policy.allow_per_question``, default false): the guard withholds it from the outbound message whatever the
handler computed; the simulation's clients follow ``eval.per_question`` (paired statistics by default); a
server whose clients withhold it reports those methods without paired differences and names the clients."""

import dataclasses

import pytest

from fedkt import registry
from fedkt.clients import ClientContext, ClientFactory, ClientSpec
from fedkt.config import LoraSettings, TrainConfig
from fedkt.message import Message, encode
from fedkt.privacy.outbound import GATED, check_reply, reply_keys, withhold, withheld
from fedkt.privacy.policy import ClientPolicy, guard
from fedkt.registry import load_config
from fedkt.report import render
from fedkt.report_paired import NO_DATA, WITHHELD, lacking_clients, per_question
from fedkt.reply_schemas import Key, correctness
from fedkt.run_results import RunResults, ids_fingerprint
from fedkt.simulation import policy_for_experiment
from test_paired_results import ARC, OBQA, hand_run, mc, metrics, results

STANDALONE = "fedkt.algorithms.baselines:client_train_and_evaluate"


def flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


# ------------------------------------------------------------------------------------ the policy switch
def test_the_switch_is_off_by_default_and_read_from_the_client_file(tmp_path):
    from fedkt.federation.flower_client_file import load_client_file
    from fedkt.federation.flower_spec import spec_from_json, spec_to_json

    assert ClientPolicy().allow_per_question is False
    # every switch a reply key is gated by is a boolean of the client's policy, off by default
    switches = {s for keys in GATED.values() for s in keys.values()}
    assert switches == {"allow_per_question"}
    assert all(getattr(ClientPolicy(), s) is False for s in switches)
    assert {h for h, keys in GATED.items() if keys == {"correct": "allow_per_question"}} == {
        STANDALONE, "fedkt.algorithms.fdkt.client:client_train_and_evaluate",
        "fedkt.algorithms.fedcot:client_decode_train"}
    f = tmp_path / "client.toml"
    f.write_text('[client]\ncid = "h1"\n')
    assert load_client_file(f)["policy"].allow_per_question is False
    f.write_text('[client]\ncid = "h1"\n[policy]\nallow_per_question = true\n')
    p = load_client_file(f)["policy"]
    assert p == ClientPolicy(allow_per_question=True)
    spec = ClientSpec(cid="h1", model="m", policy=p)
    assert spec_from_json(spec_to_json(spec)).policy.allow_per_question is True
    # only an optional top-level meta key can be switched (the client drops it whole, the reply stays valid)
    with pytest.raises(ValueError, match=r"meta\.correct: only an optional, top-level meta key"):
        Key("meta.correct", "declared disclosure", "why it may leave", correctness, required=True,
            policy="allow_per_question")
    with pytest.raises(ValueError, match=r"meta\.dp\.steps: only an optional, top-level meta key"):
        Key("meta.dp.steps", "declared disclosure", "why it may leave", correctness, policy="allow_per_question")


def test_the_guard_withholds_what_a_handler_computed_anyway(capsys):
    """A handler that puts meta.correct in its reply (as every client-evaluating handler does when the server
    asks): with the switch off the guard sends the reply without it; with it on, unchanged."""
    bits = {"arc_easy": {"ids": "abc", "acc": "0110", "acc_norm": "0100"}}

    def client_train_and_evaluate(ctx, msg):  # registered under the standalone handler's key
        return Message(meta={"metrics": {"arc_easy": {"acc": 0.5, "n": 4}}, "num_examples": 0, "correct": bits})

    client_train_and_evaluate.__module__ = "fedkt.algorithms.baselines"
    handler = guard("standalone", {"train_and_evaluate": client_train_and_evaluate})["train_and_evaluate"]
    off = handler(ClientContext("h1"), Message(meta={"epochs": 1}))
    assert off.meta == {"metrics": {"arc_easy": {"acc": 0.5, "n": 4}}, "num_examples": 0}
    assert not [k for k in reply_keys(off) if k.startswith("meta.correct")] and b"correct" not in encode(off)
    assert flat(capsys.readouterr().err) == (
        "h1: meta.correct withheld from the reply to standalone.train_and_evaluate: policy.allow_per_question = "
        "false (local; the server gets the reply without it)")
    on = handler(ClientContext("h1", policy=ClientPolicy(allow_per_question=True)), Message(meta={"epochs": 1}))
    assert on.meta["correct"] == bits and capsys.readouterr().err == ""
    # the pieces: which keys, and the reply without them still passes the allow-list
    msg = Message(meta={"metrics": {}, "correct": bits})
    assert withheld(STANDALONE, msg, ClientPolicy()) == ["correct"]
    assert withheld(STANDALONE, msg, ClientPolicy(allow_per_question=True)) == []
    assert withhold(STANDALONE, msg, ClientPolicy(allow_per_question=True)) is msg
    assert withhold(STANDALONE, msg, ClientPolicy()).meta == {"metrics": {}} and msg.meta["correct"] == bits
    assert withheld(STANDALONE, msg, object()) == ["correct"]  # a policy without the switch: withheld
    check_reply(STANDALONE, "standalone.train_and_evaluate", withhold(STANDALONE, msg, ClientPolicy()))


def test_a_deployed_client_sends_no_per_question_correctness_unless_its_policy_allows(model_dirs, data_dir):
    """A deployed standalone client (no simulation flag), the server's eval.per_question = true (the default):
    the outbound reply of the default policy holds metrics and n only, although the handler scored every
    question; with allow_per_question = true it also holds the bits, whose means are the metrics."""
    from fedkt.data.tasks import load_jsonl, load_task

    exs = load_task("arc_easy", "test", data_dir)
    spec = ClientSpec(cid="h1", model=str(model_dirs["slm"]), lora=LoraSettings(r=4, alpha=8),
                      train=TrainConfig(batch_size=4, max_steps=2),
                      examples=load_jsonl(data_dir / "arc_easy" / "train.jsonl", task="arc_easy")[:8],
                      eval_sets={"arc_easy": exs})
    assert spec.eval.per_question and not spec.simulation
    handler = registry.get("standalone").handlers["train_and_evaluate"]
    request = Message(meta={"epochs": 1.0})
    inner = handler.__wrapped__(ClientFactory(share_base=False).build(spec), request)
    assert set(inner.meta) == {"metrics", "num_examples", "correct"}  # what the handler computed ...
    off = handler(ClientFactory(share_base=False).build(spec), request)
    assert set(off.meta) == {"metrics", "num_examples"} and b"correct" not in encode(off)  # ... and what leaves
    on = handler(ClientFactory(share_base=False).build(dataclasses.replace(
        spec, policy=ClientPolicy(allow_per_question=True))), request)
    assert set(on.meta) == {"metrics", "num_examples", "correct"}
    assert on.meta["metrics"] == off.meta["metrics"] == inner.meta["metrics"]  # the same training, seeded
    got = on.meta["correct"]["arc_easy"]
    assert got["ids"] == ids_fingerprint([e.id for e in exs]) and len(got["acc"]) == 12
    assert on.meta["metrics"]["arc_easy"]["acc"] == pytest.approx(got["acc"].count("1") / 12)


# ----------------------------------------------------------------------------------------- simulation
def test_simulation_follows_eval_per_question():
    assert policy_for_experiment(load_config(None, [])).allow_per_question is True
    assert policy_for_experiment(load_config(None, ["eval.per_question=false"])).allow_per_question is False


def test_a_withholding_client_leaves_its_method_unpaired_and_named(tmp_path, model_dirs, data_dir, monkeypatch,
                                                                  capsys):
    """In process, zero-shot + standalone + FedAvg; client1's policy withholds per-question correctness (the
    deployed default), the others follow the experiment. The message client1 sends has no meta.correct, the
    run completes, FedAvg − Zero-shot is paired, Standalone (whose share over two of three clients would not be
    its reported accuracy) is not, and report.md names client1."""
    from fedkt.experiment import run_experiment
    from fedkt.federation.local import LocalFederation
    from fedkt.simulation import Simulation
    from test_runs import tiny_config

    orig_spec, orig_deliver = Simulation.client_spec, LocalFederation._deliver
    sent: dict[str, Message] = {}

    def spec(self, i, method):
        s = orig_spec(self, i, method)
        assert s.policy.allow_per_question  # the simulation's default
        if s.cid == "client1":
            s.policy = dataclasses.replace(s.policy, allow_per_question=False)
        return s

    def deliver(self, method, payloads, round):
        out = orig_deliver(self, method, payloads, round)
        if method == "train_and_evaluate":
            sent.update({c: d.reply for c, d in out.items()})
        return out

    monkeypatch.setattr(Simulation, "client_spec", spec)
    monkeypatch.setattr(LocalFederation, "_deliver", deliver)
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["zero_shot", "standalone", "fedavg"])
    res = run_experiment(cfg, tmp_path / "r")
    assert set(sent) == {"client0", "client1", "client2"}
    assert set(sent["client1"].meta) == {"metrics", "num_examples"}
    assert all(set(sent[c].meta) == {"metrics", "num_examples", "correct"} for c in ("client0", "client2"))
    err = flat(capsys.readouterr().err)
    assert ("client1: meta.correct withheld from the reply to standalone.train_and_evaluate: "
            "policy.allow_per_question = false") in err
    assert ("client1: sent its metrics without per-question correctness (its policy withholds them unless "
            "policy.allow_per_question = true): this method stays out of the paired statistics") in err
    m = res["methods"]["standalone"]
    assert set(m["per_client"]) == {"client0", "client1", "client2"}
    assert set(m["per_client_correct"]) == {"client0", "client2"}
    run = RunResults.from_dict(res)
    assert per_question(run, "standalone", "slm") is None and lacking_clients(run, "standalone") == ["client1"]
    assert per_question(run, "fedavg", "slm") and lacking_clients(run, "fedavg") == []
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| FedAvg − Zero-shot |" in report and "Standalone −" not in report and "− Standalone" not in report
    assert ("Not in the paired tables (no per-question correctness recorded): Standalone. Without per-question "
            "correctness from every client (a paired difference over the others would not be the table's "
            f"accuracy) — Standalone: client1; {WITHHELD}.") in report


# ----------------------------------------------------------------------------------------------- report
def test_report_pairs_a_client_evaluated_method_only_with_every_clients_correctness():
    run = hand_run()
    assert "| Standalone − Zero-shot |" in render(run)
    del run["methods"]["standalone"]["per_client_correct"]["client1"]  # client1 withheld its bits
    r = RunResults.from_dict(run)
    assert per_question(r, "standalone", "slm") is None and lacking_clients(r, "standalone") == ["client1"]
    text = render(run)
    assert "| FedCoLLM − Zero-shot |" in text and "| Standalone − Zero-shot |" not in text
    assert "| FedCoLLM − Standalone |" not in text
    assert "— Standalone: client1; a client sends per-question correctness only where its own policy" in text
    # a run whose only method's clients all withheld them: the section says so and names them, not NO_DATA
    only = results({"standalone": {**run["methods"]["standalone"], "per_client_correct": None}},
                   {"arc_easy": ARC, "openbookqa": OBQA})
    text = render(only)
    assert NO_DATA not in text and "Paired differences\n" not in text
    assert ("Paired differences: not shown — no method has per-question correctness. Without per-question "
            "correctness from every client (a paired difference over the others would not be the table's "
            f"accuracy) — Standalone: client0, client1; {WITHHELD}.") in text
    # results.json of a fedkt before per-question data (no questions): no client is blamed
    old = {**only, "questions": None}
    assert lacking_clients(RunResults.from_dict(old), "standalone") == [] and NO_DATA in render(old)


def test_report_checks_each_round_of_fedcot_paper_mode():
    """FedCoT's paper mode keeps per-client metrics and correctness per round (no method-level per_client):
    a round where a client withheld is unpaired, a round with all is paired, and the final one is the last
    evaluated round's."""
    ids = {"arc_easy": ARC}
    c0, c1 = "1111100000", "1111111100"
    both = {"client0": {"arc_easy": mc(c0, ARC)}, "client1": {"arc_easy": mc(c1, ARC)}}
    per_client = {"client0": metrics({"arc_easy": c0}), "client1": metrics({"arc_easy": c1})}
    rounds = [{"round": 1, "slm": metrics({"arc_easy": c0}), "per_client": per_client, "per_client_correct": both},
              {"round": 2, "slm": metrics({"arc_easy": c0}), "per_client": per_client,
               "per_client_correct": {"client0": both["client0"]}}]
    run = RunResults.from_dict(results({"fedcot": {"slm": metrics({"arc_easy": c0}), "per_round": rounds,
                                                   "per_client_correct": rounds[-1]["per_client_correct"]}}, ids))
    assert per_question(run, "fedcot", "slm", round=1)["arc_easy"] == {
        q: (int(a) + int(b)) / 2 for q, a, b in zip(ARC, c0, c1)}
    assert per_question(run, "fedcot", "slm", round=2) is None
    assert per_question(run, "fedcot", "slm") is None and lacking_clients(run, "fedcot") == ["client1"]
    assert sum(per_question(run, "fedcot", "slm", round=1)["arc_easy"].values()) == 6.5  # 5 × 1 + 3 × 0.5



def test_privacy_doc_lists_every_policy_key_with_its_default():
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "privacy.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
            for line in text.splitlines() if line.startswith("| `")}
    assert {f.name for f in dataclasses.fields(ClientPolicy)} <= set(rows)
    assert rows["allow_per_question"] == "`false`" and rows["allow_clear_adapters"] == "`false`"
