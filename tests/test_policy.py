"""The client's privacy policy: refusals of out-of-policy requests (exact errors), the kit and model
checks, the client file's [policy] table, and the failure policy when one client refuses."""

import json
import re
import math

import pytest
import torch

from fedkt import registry
from fedkt.clients import ClientContext, ClientFactory, ClientSpec
from fedkt.config import ConfigError, LoraSettings, from_dict
from fedkt.registry import load_config
from fedkt.federation.base import Message
from fedkt.privacy.policy import SECURE_AGGREGATION, ClientPolicy, PolicyViolation, model_sha256
from fedkt.simulation import policy_for_experiment


def handler(method, name):
    return registry.get(method).handlers[name]


def refusal(method, name, meta, ctx=None):
    with pytest.raises(PolicyViolation) as e:
        handler(method, name)(ctx or ClientContext("c0"), Message(meta=meta))
    return str(e.value)


def test_server_asks_infinite_epsilon_refused():
    msg = refusal("fedcot", "encode", {"epsilon": math.inf, "kit": ""})
    assert msg == ("policy.fedcot_max_token_epsilon = 6 refuses the server's request fedcot.epsilon = inf; ε = inf "
                   "switches the noise off; set policy.allow_infinite_epsilon = true to accept that")
    msg = refusal("fdkt", "synthesize", {"epsilon": math.inf, "delta": 1e-5, "dp_epochs": 1, "samples": 4})
    assert msg.startswith("policy.fdkt_max_epsilon = 10 refuses the server's request fdkt.epsilon = inf")
    # FedCoLLM's FDKT synthesis is held to the same [fdkt] keys
    assert refusal("fedcollm", "synthesize", {"epsilon": 50.0, "delta": 1e-5, "dp_epochs": 1, "samples": 4}) == (
        "policy.fdkt_max_epsilon = 10 refuses the server's request fdkt.epsilon = 50; raise policy.fdkt_max_epsilon "
        "to accept it")


def test_weak_protection_and_ceilings_refused():
    assert refusal("fedcot", "encode", {"epsilon": 10.0}) == (
        "policy.fedcot_max_token_epsilon = 6 refuses the server's request fedcot.epsilon = 10; raise "
        "policy.fedcot_max_token_epsilon to accept it")
    assert refusal("fdkt", "synthesize", {"epsilon": 3.0, "delta": 1e-3, "dp_epochs": 1, "samples": 4}).startswith(
        "policy.fdkt_max_delta = 1e-05 refuses the server's request fdkt.delta = 0.001")
    assert refusal("fdkt", "synthesize", {"epsilon": 3.0, "delta": 1e-5, "dp_epochs": 1, "samples": 10**6}).startswith(
        "policy.max_samples = 4096 refuses the server's request fdkt.samples = 1000000")
    assert refusal("standalone", "train_and_evaluate", {"epochs": 100}) == (
        "policy.max_epochs = 50 refuses the server's request standalone.train_and_evaluate.epochs = 100; raise "
        "policy.max_epochs to accept it")
    ctx = ClientContext("c0", policy=ClientPolicy(max_epochs=5, allow_clear_adapters=True))
    assert refusal("fedavg", "fit", {"epochs": 6, "round": 1}, ctx).startswith(
        "policy.max_epochs = 5 refuses the server's request fedavg.fit.epochs = 6")
    ctx = ClientContext("c0", policy=ClientPolicy(allowed_methods=["fedcot"]))
    assert refusal("fdkt", "synthesize", {"epsilon": 3.0}, ctx).startswith(
        "policy.allowed_methods = ['fedcot'] refuses the server's request method = 'fdkt'")


def test_adapters_leave_only_under_secure_aggregation():
    assert refusal("fedavg", "fit", {"epochs": 1, "round": 1}) == (
        "policy.allow_clear_adapters = false refuses the server's request fedavg.fit = 'adapter upload without "
        "secure aggregation'; set federation.secure_aggregation = true on the server, or "
        "policy.allow_clear_adapters = true on this client")
    # FedCoT's shared variant uploads adapters too; the paper's mode (share_adapters = false) uploads none
    assert refusal("fedcot", "decode_train", {"epochs": 1, "round": 1, "decode_tokens": 8, "share_adapters": True}
                   ).startswith("policy.allow_clear_adapters = false refuses the server's request fedcot.decode_train")
    from fedkt.privacy.policy import check_request

    check_request(ClientContext("c0"), "fedcot", "decode_train", handler("fedcot", "decode_train").__wrapped__,
                  Message(meta={"epochs": 1, "decode_tokens": 8, "share_adapters": False}))

    fit = handler("fedavg", "fit")
    token = SECURE_AGGREGATION.set(True)  # what flower_secagg's SecAgg+ train path sets around the handler
    try:
        check_request(ClientContext("c0"), "fedavg", "fit", fit.__wrapped__, Message(meta={"epochs": 1}))
    finally:
        SECURE_AGGREGATION.reset(token)


def test_policy_validates_itself_and_reads_from_a_table():
    with pytest.raises(ConfigError, match=r"policy\.fedcot_max_token_epsilon must be > 0, got 0"):
        from_dict(ClientPolicy, {"fedcot_max_token_epsilon": 0}, prefix="policy.")
    with pytest.raises(ConfigError, match=r"unknown key policy\.bogus"):
        from_dict(ClientPolicy, {"bogus": 1}, prefix="policy.")
    with pytest.raises(ConfigError, match="give lowercase hex sha256"):
        from_dict(ClientPolicy, {"allowed_models": ["abc"]}, prefix="policy.")
    p = from_dict(ClientPolicy, {"fedcot_max_token_epsilon": 6, "allow_infinite_epsilon": True}, prefix="policy.")
    assert p.fedcot_max_token_epsilon == 6.0 and p.allow_infinite_epsilon and not p.allow_clear_adapters


def test_client_file_policy_table_and_secret_seed(tmp_path):
    from fedkt.federation.flower_client_file import load_client_file

    f = tmp_path / "client.toml"
    f.write_text('[client]\ncid = "h1"\nsecret_seed = "00112233445566778899aabbccddeeff"\n\n'
                 '[policy]\nfedcot_max_token_epsilon = 6.0\nallowed_methods = ["fedcot"]\n')
    d = load_client_file(f)
    assert d["policy"] == ClientPolicy(fedcot_max_token_epsilon=6.0, allowed_methods=["fedcot"])
    f.write_text('[client]\ncid = "h1"\n')
    assert load_client_file(f)["policy"] == ClientPolicy()  # safe defaults
    f.write_text('[client]\ncid = "h1"\nsecret_seed = 12345\n')
    with pytest.raises(ConfigError, match=r"secret_seed = 12345 has 14 bits \(< 64\)"):
        load_client_file(f)
    f.write_text('[client]\ncid = "h1"\n[policy]\nmax_epochs = -1\n')
    with pytest.raises(ConfigError, match=r"client.toml: policy\.max_epochs must be > 0, got -1"):
        load_client_file(f)


def test_spec_json_carries_the_policy(tmp_path):
    from fedkt.federation.flower_spec import spec_from_json, spec_to_json

    spec = ClientSpec(cid="a", model="m", policy=ClientPolicy(fdkt_max_epsilon=2.0, max_epochs=math.inf),
                      simulation=True)
    back = spec_from_json(spec_to_json(spec))
    assert back == spec and back.policy.max_epochs == math.inf


def test_simulation_policy_mirrors_the_experiment():
    cfg = load_config(None, ["methods=[\"fedcot\", \"fdkt\"]", "model.llm=\"llm\"", "fedcot.epsilon=inf", "fdkt.epsilon=4.0",
                             "fdkt.delta=1e-6"])
    p = policy_for_experiment(cfg)
    assert p.allowed_methods == ["fedcot", "fdkt"] and p.allow_infinite_epsilon and p.fdkt_max_epsilon == 4.0
    assert p.fdkt_max_delta == 1e-6 and p.allow_clear_adapters


def test_changed_model_refused(model_dirs):
    from fedkt.models import load_model

    spec = ClientSpec(cid="a", model=str(model_dirs["slm"]), lora=LoraSettings(r=4, alpha=8))
    ctx = ClientFactory(share_base=False).build(spec)
    plain, _ = load_model(str(model_dirs["slm"]))
    own = model_sha256(plain)
    assert model_sha256(ctx.slm.model) == own  # the LoRA-wrapped copy hashes like the plain model
    other = model_sha256(load_model(str(model_dirs["llm"]))[0])
    assert other != own
    ctx.policy = ClientPolicy(allowed_models=[other], max_epochs=1)
    msg = refusal("standalone", "train_and_evaluate", {"epochs": 1}, ctx)
    assert msg.startswith(f"policy.allowed_models = ['{other[:12]}…'] refuses the server's request model.sha256 = "
                          f"'{own}'")
    with torch.no_grad():  # one edited weight changes the hash
        plain.get_input_embeddings().weight[0, 0] += 1
        plain._fedkt_sha256 = None
    assert model_sha256(plain) != own


# ------------------------------------------------------------------------------------- the FedCoT kit
@pytest.fixture()
def kit_dir(tmp_path, tok, model_dirs):
    from fedkt.models import load_model
    from fedkt.privacy.text_dp import EmbeddingKit

    model, mtok = load_model(str(model_dirs["slm"]))
    kit = EmbeddingKit.build(model.get_input_embeddings().weight.detach(), mtok, n_neighbors=8)
    return kit.save(tmp_path / "kit"), mtok


def edited(path, dest, **change):
    from safetensors.torch import load_file, save_file
    import shutil

    shutil.copytree(path, dest)
    t = load_file(str(dest / "kit.safetensors"))
    for k, fn in change.items():
        t[k] = fn(t[k].clone())
    save_file(t, str(dest / "kit.safetensors"))
    return dest


def test_validated_kit_loads_and_edited_kits_are_refused(kit_dir, tmp_path):
    from fedkt.privacy.kit_check import KitValidationError, validate_kit
    from fedkt.privacy.text_dp import EmbeddingKit

    path, tok = kit_dir
    validate_kit(EmbeddingKit.load(path), tok)  # the kit fedkt builds passes

    def dup(nb):
        nb[:, 2] = nb[:, 1]
        return nb

    def singleton_classes(c):
        return torch.arange(len(c)).to(torch.int8)

    cases = {"dup": ({"neighbors": dup}, "names the same token twice"),
             "util": ({"utility": lambda u: u * 5}, "utilities are not all finite and in [-1, 0]"),
             "cls": ({"token_class": singleton_classes}, "token classes differ from this tokenizer's"),
             "rank": ({"utility": lambda u: torch.where(u > -1, u / 2, u)}, "rank utilities are not exactly -j/N")}
    for name, (change, reason) in cases.items():
        bad = EmbeddingKit.load(edited(path, tmp_path / name, **change))
        with pytest.raises(KitValidationError, match=re.escape(reason)):
            validate_kit(bad, tok, where=name)


def test_client_refuses_a_kit_it_did_not_pin(kit_dir, tmp_path, model_dirs):
    from fedkt.privacy.kit_check import KitValidationError, client_kit, kit_sha256

    path, tok = kit_dir
    ctx = ClientFactory(share_base=False).build(ClientSpec(cid="a", model=str(model_dirs["slm"]),
                                                           lora=LoraSettings(r=4, alpha=8)))
    good = kit_sha256(path)
    ctx.policy = ClientPolicy(fedcot_kit_sha256=[good])
    assert client_kit(ctx, {"kit": str(path)}).n_neighbors == 8
    bad = edited(path, tmp_path / "bad", utility=lambda u: u * 0)  # all utilities 0: a changed file
    with pytest.raises(PolicyViolation, match=r"policy\.fedcot_kit_sha256 = \['.{12}…'\] refuses the server's "
                                              r"request fedcot\.kit = .*bad \(sha256 [0-9a-f]{64}\)"):
        client_kit(ctx, {"kit": str(bad)})
    ctx.policy = ClientPolicy()  # no pin: validation still refuses the edited kit
    with pytest.raises(KitValidationError, match="fails validation"):
        client_kit(ctx, {"kit": str(bad)})
    ctx.policy = ClientPolicy(fedcot_kit_model=str(model_dirs["slm"]))  # built here, server's file ignored
    assert client_kit(ctx, {"kit": str(bad), "kit_neighbors": 8}).meta["n_neighbors"] == 8


# ------------------------------------------------------------------------------ the failure policy
def test_a_refusing_client_is_skipped_and_the_round_goes_on(tmp_path, model_dirs, data_dir, monkeypatch):
    from fedkt.experiment import run_experiment
    from fedkt.simulation import Simulation
    from test_runs import tiny_config

    orig = Simulation.client_spec

    def strict_client1(self, i, method):
        spec = orig(self, i, method)
        if spec.cid == "client1":
            spec.policy = ClientPolicy()  # the safe defaults: no adapter leaves without secure aggregation
        return spec

    monkeypatch.setattr(Simulation, "client_spec", strict_client1)
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedavg"], **{"federation.on_client_failure": '"skip"'})
    res = run_experiment(cfg, tmp_path / "r")["methods"]["fedavg"]
    assert [f["client"] for f in res["failures"]] == ["client1", "client1"]  # both rounds
    assert all(f["error"].startswith("PolicyViolation(") and "policy.allow_clear_adapters = false refuses the "
               "server's request fedavg.fit = 'adapter upload without secure aggregation'" in f["error"]
               for f in res["failures"])
    assert res["slm"]["arc_easy"]["n"] == 12 and len(res["per_round"]) == 2
    ups = {c for r in res["comm"]["per_round"] for c, v in r["clients"].items() if v["up_bytes"]}
    assert ups == {"client0", "client2"}
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedavg"])  # "stop": the run ends, naming the client
    with pytest.raises(Exception, match="client client1 failed in 'fit': PolicyViolation: policy.allow_clear_adapters"):
        run_experiment(cfg, tmp_path / "r2")


def test_deployed_fedcot_client_end_to_end_through_its_guarded_handler(kit_dir, model_dirs, data_dir):
    """A deployed client (no simulation flag): the guarded encode handler checks the request, validates the
    kit, perturbs with CSPRNG draws (two calls differ) and replies only allow-listed keys."""
    from fedkt.data.tasks import load_jsonl
    from fedkt.privacy.kit_check import kit_sha256

    path, _ = kit_dir
    spec = ClientSpec(cid="h1", model=str(model_dirs["slm"]), lora=LoraSettings(r=4, alpha=8),
                      examples=load_jsonl(data_dir / "arc_easy" / "train.jsonl", task="arc_easy")[:6],
                      policy=ClientPolicy(fedcot_kit_sha256=[kit_sha256(path)]))
    encode = handler("fedcot", "encode")
    one = encode(ClientFactory(share_base=False).build(spec), Message(meta={"epsilon": 3.0, "kit": str(path)}))
    two = encode(ClientFactory(share_base=False).build(spec), Message(meta={"epsilon": 3.0, "kit": str(path)}))
    assert one.meta["randomness"] == "csprng" and set(one.meta) == {
        "epsilon_per_token", "tokens", "prompt_epsilon_mean", "prompt_epsilon_max", "randomness"}
    assert len(one.texts) == 6 and one.texts != two.texts
    capped = ClientPolicy(fedcot_max_prompt_epsilon=30.0)
    ctx = ClientFactory(share_base=False).build(spec)
    ctx.policy = capped
    with pytest.raises(PolicyViolation, match=r"policy\.fedcot_max_prompt_epsilon = 30 refuses the server's request "
                                              r"fedcot\.epsilon × tokens = \d+"):
        encode(ctx, Message(meta={"epsilon": 3.0, "kit": str(path)}))
