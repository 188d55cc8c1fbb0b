"""``[metrics] tensorboard / mlflow``: metrics.jsonl rows mirrored live to TensorBoard and MLflow, read back with
the libraries' own readers. The config error without the packages runs always; the rest needs the extras
(``pip install 'fedkt[tensorboard,mlflow]'``) and skips without them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedkt.config import ConfigError
from fedkt.metrics_export import MetricsExporter, row_scalars
from fedkt.registry import load_config

ROW = {"time": 1700000000.5, "method": "fedavg", "round": 2, "role": "slm", "round_s": 8.25, "eval_s": 1.5,
       "sampled_clients": [0, 2], "skipped": False, "note": "text",
       "metrics": {"arc_easy": {"acc": 0.5, "acc_norm": 0.25, "n": 12}}}


def test_a_row_becomes_role_task_metric_scalars_at_its_round():
    assert row_scalars(ROW) == ("fedavg", 2, 1700000000.5, {
        "slm/round_s": 8.25, "slm/eval_s": 1.5, "slm/arc_easy/acc": 0.5, "slm/arc_easy/acc_norm": 0.25,
        "slm/arc_easy/n": 12.0})
    client_row = {"time": 1.0, "method": "standalone", "client": 3, "role": "slm",
                  "metrics": {"arc_easy": {"acc": 0.75}}}
    assert row_scalars(client_row) == ("standalone", 0, 1.0, {"slm/client3/arc_easy/acc": 0.75})


@pytest.mark.parametrize("key", ["tensorboard", "mlflow"])
def test_without_the_package_the_config_is_refused(monkeypatch, key):
    import fedkt.config

    real = fedkt.config.find_spec
    monkeypatch.setattr(fedkt.config, "find_spec", lambda name: None if name == key else real(name))
    with pytest.raises(ConfigError, match=rf"metrics\.{key} = true, but the '{key}' package is not installed: "
                                          rf"pip install 'fedkt\[{key}\]'"):
        load_config(None, [f"metrics.{key}=true"])
    assert load_config(None, []).metrics.tensorboard is False  # off by default: nothing needed


def test_a_server_uri_is_refused():
    with pytest.raises(ConfigError, match=r"metrics\.mlflow_dir = 'http://host:5000': a local directory"):
        load_config(None, ['metrics.mlflow_dir="http://host:5000"'])


class Broken:
    name = "Broken"

    def write(self, *a):
        raise OSError("disk full")

    def close(self):
        pass


class Recorder:
    name = "Recorder"

    def __init__(self):
        self.rows = []

    def write(self, *a):
        self.rows.append(a)

    def close(self):
        pass


def test_a_failing_sink_is_dropped_and_the_others_go_on(capsys):
    from fedkt import progress

    rec = Recorder()
    exp = MetricsExporter([Broken(), rec])
    progress.enable()
    try:
        exp.export(ROW)
        exp.export({**ROW, "round": 3})
    finally:
        progress.disable()
    assert [s.name for s in exp.sinks] == ["Recorder"] and [r[1] for r in rec.rows] == [2, 3]


# ---- with the extras installed ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def readers():
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def tb(path):
        ea = EventAccumulator(str(path), size_guidance={"scalars": 0})
        ea.Reload()
        return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}

    def ml(store):
        return MlflowClient(tracking_uri=store.resolve().as_uri())

    return tb, ml


def _cfg(tmp_path, **sets):
    return load_config(None, ['name="watch"', "metrics.tensorboard=true", "metrics.mlflow=true",
                              *[f"{k}={v}" for k, v in sets.items()]])


def test_each_row_is_readable_as_soon_as_it_is_written(tmp_path, readers):
    tb, ml = readers
    exp = MetricsExporter.for_run(_cfg(tmp_path), tmp_path)
    exp.export(ROW)
    # before close: live
    assert tb(tmp_path / "tensorboard" / "fedavg")["slm/arc_easy/acc"] == [(2, 0.5)]
    client = ml(tmp_path / "mlruns")
    rid = json.loads((tmp_path / "mlflow_runs.json").read_text())["fedavg"]
    hist = client.get_metric_history(rid, "slm/arc_easy/acc")
    assert [(m.step, m.value, m.timestamp) for m in hist] == [(2, 0.5, 1700000000500)]
    run = client.get_run(rid)
    assert run.info.status == "RUNNING" and run.data.params["train.lr"] == "0.0003"
    assert run.data.params["methods"] == '["zero_shot", "standalone", "fedavg"]'
    assert client.get_experiment(run.info.experiment_id).name == "watch"
    exp.close()
    assert client.get_run(rid).info.status == "FINISHED"
    # a resumed run (a new exporter on the same run directory) continues the same MLflow run
    exp = MetricsExporter.for_run(_cfg(tmp_path), tmp_path)
    exp.export({**ROW, "round": 3, "metrics": {"arc_easy": {"acc": 0.75}}})
    exp.close()
    assert [(m.step, m.value) for m in client.get_metric_history(rid, "slm/arc_easy/acc")] == [(2, 0.5), (3, 0.75)]


def _expected(rows: list[dict], method: str) -> dict[str, list]:
    """What the sinks should hold for ``method``, built from metrics.jsonl by hand: role/task/metric at the
    round (0 without one; a client's rows under its id, e.g. client0)."""
    out: dict[str, list] = {}
    for r in rows:
        if r["method"] != method:
            continue
        head = r["role"] + (f"/{r['client']}" if "client" in r else "")
        for task, ms in r.get("metrics", {}).items():
            for k, v in ms.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.setdefault(f"{head}/{task}/{k}", []).append((r.get("round", 0), float(v)))
        if "round_s" in r:
            out.setdefault(f"{head}/round_s", []).append((r["round"], r["round_s"]))
    return out


def test_a_run_mirrors_metrics_jsonl_to_both(tmp_path, model_dirs, data_dir, readers):
    from fedkt.experiment import run_experiment

    tb, ml = readers
    cfg = load_config(None, [f'model.slm="{model_dirs["slm"]}"', f'data.dir="{data_dir}"', 'name="watch"',
                             'methods=["standalone","fedavg"]', "partition.num_clients=2", "partition.aux_size=8",
                             "federation.rounds=2",
                             "train.batch_size=4", "train.epochs=1.0", "eval.batch_size=16", "lora.r=4",
                             'lora.target_modules=["q_proj","v_proj"]', "metrics.tensorboard=true",
                             "metrics.mlflow=true", f'metrics.mlflow_dir="{tmp_path / "store"}"'])
    out = tmp_path / "run"
    run_experiment(cfg, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    client = ml(tmp_path / "store")
    ids = json.loads((out / "mlflow_runs.json").read_text())
    assert sorted(ids) == ["fedavg", "standalone"]
    for method in ("standalone", "fedavg"):
        want = _expected(rows, method)
        assert want, method
        got_tb = tb(out / "tensorboard" / method)
        want32 = {t: [(step, float(np.float32(v))) for step, v in series] for t, series in want.items()}
        assert {t: v for t, v in got_tb.items() if t in want} == want32  # TensorBoard keeps float32
        assert set(got_tb) >= set(want)
        run = client.get_run(ids[method])
        assert run.info.status == "FINISHED" and run.data.tags["fedkt.method"] == method
        for tag, series in want.items():
            assert [(m.step, m.value) for m in client.get_metric_history(ids[method], tag)] == series, tag
    fedavg = _expected(rows, "fedavg")
    assert [s for s, _ in fedavg["slm/arc_easy/acc"]] == [1, 2]
    assert sorted(_expected(rows, "standalone")) == ["slm/client0/arc_easy/acc", "slm/client0/arc_easy/acc_norm",
                                                     "slm/client0/arc_easy/n", "slm/client1/arc_easy/acc",
                                                     "slm/client1/arc_easy/acc_norm", "slm/client1/arc_easy/n"]
