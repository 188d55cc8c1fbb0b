"""Every key of every reply a client sends, for every method, is on the outbound allow-list with a
justification; the client refuses to send an unlisted key; docs/privacy.md shows the list in the code."""

import re
from pathlib import Path

import pytest

from fedkt import registry
from fedkt.message import Message
from fedkt.privacy.outbound import ALLOWED, CATEGORIES, OutboundViolation, check_reply, reply_keys, unlisted
from fedkt.privacy.outbound_table import markdown_table
from fedkt.privacy.policy import REQUEST_RULES, handler_key

DOC = Path(__file__).parent.parent / "docs" / "privacy.md"


def test_every_registered_handler_has_a_request_rule_and_an_allow_list():
    keys = {handler_key(fn) for spec in registry.methods().values() for fn in spec.handlers.values()}
    assert keys == set(ALLOWED) == set(REQUEST_RULES)
    for entries in ALLOWED.values():
        assert all(a.category in CATEGORIES and len(a.why) > 20 for a in entries)


def test_unlisted_key_is_refused_before_sending():
    ok = Message(texts=["x"], meta={"epsilon_per_token": 3.0, "tokens": 5, "prompt_epsilon_mean": 15.0,
                                    "prompt_epsilon_max": 15.0, "randomness": "csprng"})
    check_reply("fedkt.algorithms.fedcot:client_encode", "fedcot.encode", ok)
    bad = Message(texts=["x"], meta={**ok.meta, "changed_fraction": 0.0, "dp": {"mean_loss": 1.0}})
    with pytest.raises(OutboundViolation) as e:
        check_reply("fedkt.algorithms.fedcot:client_encode", "fedcot.encode", bad)
    assert str(e.value) == ("the reply to fedcot.encode holds meta.changed_fraction, meta.dp.mean_loss, not on the "
                            "outbound allow-list of fedkt.algorithms.fedcot:client_encode "
                            "(fedkt.privacy.outbound.ALLOWED); the client does not send it")
    # nested keys are enumerated one by one: a new DP field must be listed to leave
    assert unlisted("fedkt.algorithms.fdkt.client:client_synthesize",
                    Message(meta={"dp": {"epsilon_spent": 1.0, "mean_loss": 2.0}, "rejected": {"no_answer": 3}})) == [
        "meta.dp.mean_loss"]


def test_every_outbound_key_of_every_method_is_justified(tmp_path, model_dirs, data_dir, monkeypatch):
    """Run every method that calls clients (tiny models, one round) and enumerate every reply's keys."""
    from fedkt.federation.local import LocalFederation
    from fedkt.experiment import run_experiment
    from test_runs import tiny_config

    monkeypatch.setenv("FEDKT_CACHE", str(tmp_path / "cache"))
    seen: list[tuple[str, str, Message]] = []
    orig = LocalFederation._deliver

    def deliver(self, method, payloads, round):
        out = orig(self, method, payloads, round)
        key = handler_key(self._handlers[method])
        seen.extend((key, method, d.reply) for d in out.values() if d.reply is not None)
        return out

    monkeypatch.setattr(LocalFederation, "_deliver", deliver)
    methods = [m for m, s in registry.methods().items() if s.handlers]
    assert set(methods) == {"standalone", "fedavg", "fedavgm", "fedprox", "fedcollm", "fedcot", "fdkt"}
    extra = {"federation.rounds": 1, "partition.num_clients": 2, "train.max_steps": 2,
             "fedcot.kit_neighbors": 8, "fedcot.rationale_tokens": 4, "fedcot.decode_tokens": 4,
             "fdkt.samples_per_client": 4, "fdkt.sample_tokens": 12, "fdkt.question_tokens": 8,
             "fdkt.choice_tokens": 4, "fdkt.dp_batch_size": 8, "fdkt.dp_epochs": 1.0, "fdkt.augment_per_kept": 0,
             "fdkt.filter": '"none"', "fedcollm.aux_source": '"fdkt"'}
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, methods, **extra)
    run_experiment(cfg, tmp_path / "r")
    assert {k for k, _, _ in seen} == set(ALLOWED)  # every client handler of every method replied
    bad = {(k, key) for k, _, msg in seen for key in unlisted(k, msg)}
    assert bad == set()
    sent = {(k, key) for k, _, msg in seen for key in reply_keys(msg)}
    # the side channels of issue 19 are gone (FedAvg/FedProx keep their declared training loss)
    for k, key in sent:
        assert key not in ("meta.changed_fraction", "meta.timings.dp_train_s", "meta.timings.sample_s")
        assert key != "meta.loss" or k in ("fedkt.algorithms.fedavg:client_fit", "fedkt.algorithms.fedprox:client_fit")
    assert ("fedkt.algorithms.fedcot:client_encode", "meta.randomness") in sent
    assert ("fedkt.algorithms.fedcot:client_encode", "texts") in sent
    assert any(k == "fedkt.algorithms.fedavg:client_fit" and key.startswith("tensors.") for k, key in sent)
    # and the server's reply schemas (federation/validate.py) accept every honest reply as sent
    from fedkt.federation.validate import SCHEMAS, check_reply as server_check

    assert {method for _, method, _ in seen} <= set(SCHEMAS)
    for _, method, msg in seen:
        server_check(method, "c", msg)


def test_doc_table_is_the_code_s():
    text = DOC.read_text()
    m = re.search(r"<!-- outbound-table:start -->\n(.*?)\n<!-- outbound-table:end -->", text, re.S)
    assert m, "docs/privacy.md lost its outbound table markers"
    assert m.group(1).strip() == markdown_table().strip(), (
        "docs/privacy.md's allow-list table differs from fedkt.privacy.outbound: paste "
        "fedkt.privacy.outbound_table.markdown_table()'s output")


def test_server_schemas_and_client_allow_list_are_one_declaration():
    """The server accepts exactly the meta keys, texts and tensors some handler function of that name may send."""
    from fedkt.federation.validate import SCHEMAS
    from fedkt.reply_schemas import REPLIES

    assert set(SCHEMAS) == {r.handler for r in REPLIES} and set(ALLOWED) == {r.function for r in REPLIES}
    for name, schema in SCHEMAS.items():
        entries = [a for r in REPLIES if r.handler == name for a in ALLOWED[r.function]]
        assert set(schema.meta) | set(schema.optional) == {a.pattern.split(".")[1] for a in entries
                                                           if a.pattern.startswith("meta.")}, name
        assert schema.texts == any(a.pattern == "texts" for a in entries), name
        assert (schema.tensors == "adapter") == any(a.pattern.startswith("tensors.") for a in entries), name
    # a key required by one function but not sent by another of the same name is optional on the server
    assert "num_examples" in SCHEMAS["train_and_evaluate"].optional and "metrics" in SCHEMAS["train_and_evaluate"].meta
