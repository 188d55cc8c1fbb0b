"""End-to-end runs on tiny models: the CLI, results.json shape, bytes, reports, resume."""

import json

import pytest
import torch
from typer.testing import CliRunner

from fedkt.cli import app
from fedkt.registry import load_config
from fedkt.rounds import Checkpoints
from fedkt.federation import codec, Message
from fedkt.models import load_adapter_state
from fedkt.experiment import run_experiment


def tiny_config(tmp_path, model_dirs, data_dir, methods, **extra):
    sets = [f'model.slm="{model_dirs["slm"]}"', f'data.dir="{data_dir}"', f"methods={json.dumps(methods)}",
            "partition.num_clients=3", "partition.aux_size=8", "federation.rounds=2", "train.batch_size=4",
            "train.epochs=1.0", "train.lr=0.005", "eval.batch_size=16", "lora.r=4",
            'lora.target_modules=["q_proj","v_proj"]', "fedcollm.kd_steps=3", "fedcollm.batch_size=4"]
    if "fedcollm" in methods or extra.pop("llm", False):
        sets.append(f'model.llm="{model_dirs["llm"]}"')
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, sets), sets


def test_cli_run_all_baselines(tmp_path, model_dirs, data_dir):
    _, sets = tiny_config(tmp_path, model_dirs, data_dir, ["zero_shot", "standalone", "fedavg", "centralized"])
    cfg_file = tmp_path / "exp.toml"
    cfg_file.write_text('name = "tiny"\n')
    out = tmp_path / "run"
    args = ["run", str(cfg_file), "--out", str(out), "--quiet"]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "## Client SLMs" in res.output and "FedAvg" in res.output
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert list(methods) == ["zero_shot", "standalone", "fedavg", "centralized"]
    for m in methods.values():
        a = m["slm"]["arc_easy"]
        assert set(a) >= {"acc", "acc_norm", "n"} and a["n"] == 12 and 0 <= a["acc"] <= 1
    # 64 train rows, 8 aux -> 56 over 3 clients
    assert results["data"] == {"clients": [19, 19, 18], "aux": 8, "eval": {"arc_easy": 12},
                               "format": {"arc_easy": "harness"}}
    # FedAvg moves exactly the serialised adapter each way, per client per round
    comm = methods["fedavg"]["comm"]
    assert len(comm["per_round"]) == 2 and set(comm["per_round"][0]["clients"]) == {"client0", "client1", "client2"}
    adapter = load_adapter_state(out / "adapters" / "fedavg" / "slm")
    down = len(codec.encode(Message(tensors=adapter, meta={"round": 1, "epochs": 1.0})))
    assert comm["per_round"][0]["clients"]["client0"]["down_bytes"] == down
    assert comm["down_bytes"] == 2 * 3 * down
    up0 = comm["per_round"][0]["clients"]["client0"]["up_bytes"]
    assert sum(v.numel() * 4 for v in adapter.values()) < up0 < down + 200
    assert results["models"]["slm"]["adapter_bytes"] == sum(v.numel() * 4 for v in adapter.values())
    from fedkt.models import count_parameters, load_model

    plain, _ = load_model(str(model_dirs["slm"]))
    assert results["models"]["slm"]["params"] == count_parameters(plain)  # LoRA weights not counted
    assert results["models"]["slm"]["model_bytes"] == 4 * count_parameters(plain)
    # standalone: each client reports only metrics; the mean over clients is the result
    per_client = methods["standalone"]["per_client"]
    mean = sum(c["arc_easy"]["acc"] for c in per_client.values()) / 3
    assert methods["standalone"]["slm"]["arc_easy"]["acc"] == pytest.approx(mean)
    assert methods["standalone"]["comm"]["up_bytes"] < 1000
    assert (out / "clients" / "client1" / "standalone" / "slm" / "adapter_model.safetensors").is_file()
    report = (out / "report.md").read_text()
    assert "## Communication" in report and "## Accuracy per round" in report
    assert results["models"]["slm"]["device"] == "cpu" and results["models"]["slm"]["dtype"] == "float32"
    assert "Evaluated on arc_easy (12 questions, harness format). SLM on cpu in float32." in report
    assert (out / "accuracy_per_round.png").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for x in lines if x["method"] == "fedavg") == 2
    fedavg_rows = [x for x in lines if x["method"] == "fedavg"]
    assert all(x["round_s"] > 0 and x["eval_s"] > 0 for x in fedavg_rows)
    assert sum(x["eval_s"] for x in fedavg_rows) == pytest.approx(methods["fedavg"]["timings"]["eval_s"], abs=0.01)
    # fedkt report re-renders; fedkt eval scores a saved adapter
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0
    r = CliRunner().invoke(app, ["eval", "--model", str(model_dirs["slm"]), "--adapter",
                                 str(out / "adapters" / "fedavg" / "slm"), "--data-dir", str(data_dir)])
    assert r.exit_code == 0 and f"acc={methods['fedavg']['slm']['arc_easy']['acc']:.4f}" in r.output
    # placement: bf16 runs on the cpu (scores may move by a near-tie), a cuda request here is a clear error
    r = CliRunner().invoke(app, ["eval", "--model", str(model_dirs["slm"]), "--data-dir", str(data_dir),
                                 "--dtype", "bf16", "--json", str(tmp_path / "bf16.json")])
    assert r.exit_code == 0 and json.loads((tmp_path / "bf16.json").read_text())["arc_easy"]["n"] == 12
    if not torch.cuda.is_available():
        from fedkt.devices import DeviceError

        with pytest.raises(DeviceError, match="cuda requested but torch.cuda.is_available"):
            from fedkt.evaluate import evaluate_model

            evaluate_model(str(model_dirs["slm"]), ["arc_easy"], data_dir=str(data_dir), device="cuda")


def test_cli_errors_are_clear(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nlr = 1\nfoo = 2\n")
    from fedkt.cli import main
    import sys

    old = sys.argv
    sys.argv = ["fedkt", "run", str(cfg)]
    try:
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 2
    finally:
        sys.argv = old


def test_existing_run_dir_is_not_clobbered(tmp_path, model_dirs, data_dir):
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["zero_shot"])
    run_experiment(cfg, tmp_path / "r")
    from fedkt.config import ConfigError

    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        run_experiment(cfg, tmp_path / "r")
    other, _ = tiny_config(tmp_path, model_dirs, data_dir, ["zero_shot"], **{"train.lr": 0.1})
    with pytest.raises(ConfigError, match="config differs"):
        run_experiment(other, tmp_path / "r", resume=True)


def test_run_dir_of_an_older_version_resumes(tmp_path, model_dirs, data_dir):
    """A config.toml written before a setting existed (here: without [metrics] and eval.format) resumes
    when the run sets nothing differently; a real difference is still refused."""
    import re

    from fedkt.config import ConfigError

    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["zero_shot"])
    run_experiment(cfg, tmp_path / "r")
    path = tmp_path / "r" / "config.toml"
    old = re.sub(r"\n\[metrics\]\n(?:[^\[\n][^\n]*\n)*", "\n", path.read_text())
    old = re.sub(r'\nformat = "harness"\n', "\n", old)
    assert "[metrics]" not in old and 'format = "harness"' not in old and old != path.read_text()
    path.write_text(old)
    res = run_experiment(cfg, tmp_path / "r", resume=True)
    assert "zero_shot" in res["methods"]
    other, _ = tiny_config(tmp_path, model_dirs, data_dir, ["zero_shot"], **{"eval.format": "cloze"})
    with pytest.raises(ConfigError, match="config differs"):
        run_experiment(other, tmp_path / "r", resume=True)


class Interrupt(Exception):
    pass


def interrupt_and_resume(cfg, out, monkeypatch, exc=Interrupt, check=None):
    """Run ``cfg`` into ``out``, dying with ``exc`` right after round 2's checkpoint is saved (``check`` sees
    every saved tensor dict first), then resume it there; returns the resumed run's results."""
    orig = Checkpoints.save

    def save_then_die(self, round, tensors, state):
        orig(self, round, tensors, state)
        if check is not None:
            check(tensors)
        if round == 2:
            raise exc()

    monkeypatch.setattr(Checkpoints, "save", save_then_die)
    with pytest.raises(exc):
        run_experiment(cfg, out)
    monkeypatch.setattr(Checkpoints, "save", orig)
    return run_experiment(cfg, out, resume=True)



@pytest.mark.parametrize("method", ["fedavg", "fedprox", "fedcollm"])
def test_resumed_run_equals_uninterrupted(tmp_path, model_dirs, data_dir, monkeypatch, method):
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, [method], **{"federation.rounds": 3})
    full = run_experiment(cfg, tmp_path / "full")

    resumed = interrupt_and_resume(cfg, tmp_path / "cut", monkeypatch)
    for role in (["slm", "llm"] if method == "fedcollm" else ["slm"]):
        a = load_adapter_state(tmp_path / "full" / "adapters" / method / role)
        b = load_adapter_state(tmp_path / "cut" / "adapters" / method / role)
        assert all(torch.equal(a[k], b[k]) for k in a), role
    f, r = full["methods"][method], resumed["methods"][method]
    assert f["per_round"] == r["per_round"] and f["comm"] == r["comm"]


def test_eval_only_last_round(tmp_path, model_dirs, data_dir):
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedavg"], **{"eval.every_round": "false",
                                                                         "federation.rounds": 2})
    res = run_experiment(cfg, tmp_path / "r")["methods"]["fedavg"]
    assert "slm" not in res["per_round"][0] and res["per_round"][1]["slm"] == res["slm"]
    assert res["timings"]["eval_s"] > 0


def test_files_scheme_and_skip_policy(tmp_path, model_dirs, data_dir, monkeypatch):
    from conftest import write_arc

    files = [write_arc(tmp_path / f"c{i}.jsonl", 6 + i, start=500 + 100 * i) for i in range(2)]
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedavg"], **{
        "partition.scheme": '"files"', "partition.num_clients": 2,
        "partition.files": json.dumps([str(f) for f in files]), "partition.aux_size": 4,
        "federation.on_client_failure": '"skip"', "federation.rounds": 1})
    import fedkt.algorithms.fedavg as fa

    orig = fa.sft

    def flaky(model, tok, examples, *a, **k):
        if len(examples) == 7:  # client1's file has 7 rows
            raise RuntimeError("client1 crashed")
        return orig(model, tok, examples, *a, **k)

    monkeypatch.setattr(fa, "sft", flaky)
    res = run_experiment(cfg, tmp_path / "r")
    assert res["data"]["clients"] == [6, 7] and res["data"]["aux"] == 4
    m = res["methods"]["fedavg"]
    assert [f["client"] for f in m["failures"]] == ["client1"] and "client1 crashed" in m["failures"][0]["error"]
    assert set(m["comm"]["per_round"][0]["clients"]) == {"client0"}


def test_derive_cli(tmp_path, model_dirs):
    out = tmp_path / "d"
    r = CliRunner().invoke(app, ["derive-slm", "--parent", str(model_dirs["llm"]), "--out", str(out),
                                 "--layers", "0,3", "--steps", "2", "--set", "num_prompts=4",
                                 "--set", "eval_texts=2", "--set", "gen_tokens=8", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layers_kept"] == [0, 3] and (out / "config.json").is_file()
    bad = CliRunner().invoke(app, ["derive-slm", "--parent", str(model_dirs["llm"]), "--set", "stepz=3"])
    assert bad.exit_code != 0 and "unknown key derive.stepz" in str(bad.exception)


def test_fedcollm_experiment_with_all_methods(tmp_path, model_dirs, data_dir):
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir,
                         ["zero_shot", "fedcollm", "fedavg", "standalone", "centralized"],
                         **{"federation.rounds": 1, "data.eval_tasks": '["arc_easy"]'})
    res = run_experiment(cfg, tmp_path / "r")
    m = res["methods"]
    assert set(m["zero_shot"]) >= {"slm", "llm"} and set(m["centralized"]) >= {"slm", "llm"}
    assert "llm" in m["fedcollm"] and m["fedcollm"]["per_round"][0]["distill"]["steps"] == 3
    assert m["fedcollm"]["comm"] == m["fedavg"]["comm"]  # same client protocol, same bytes
    assert set(m["fedcollm"]["timings"]) == {"client_train_s", "aggregate_s", "distill_s", "eval_s"}
    report = (tmp_path / "r" / "report.md").read_text()
    assert report.index("## Server LLM") < report.index("## Client SLMs")
    slm_table = report[report.index("## Client SLMs"):report.index("## Paired differences")]
    rows = [line.split("|")[1].strip() for line in slm_table.splitlines() if line.startswith("| ")][1:]
    assert rows == ["Zero-shot", "Standalone", "FedAvg", "FedCoLLM", "Centralized"]
    from peft import PeftModel

    from fedkt.models import load_model

    base, _ = load_model(str(model_dirs["llm"]))
    PeftModel.from_pretrained(base, str(tmp_path / "r" / "adapters" / "centralized" / "llm"))


def test_fedcollm_logs_llm_metrics_only_when_evaluated(tmp_path, model_dirs, data_dir):
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedcollm"], **{"eval.every_round": "false"})
    res = run_experiment(cfg, tmp_path / "r")["methods"]["fedcollm"]
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    llm = {x["round"]: x for x in lines if x["role"] == "llm"}
    assert "metrics" not in llm[1] and "distill" in llm[1]
    assert llm[2]["metrics"] == res["llm"] and "llm" not in res["per_round"][0]


def test_model_threads_is_applied(tmp_path, model_dirs, data_dir):
    """model.threads sets torch's intra-op threads for the run (it was read by nothing for a while)."""
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["zero_shot"], **{"model.threads": want})
    try:
        run_experiment(cfg, tmp_path / "r")
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
