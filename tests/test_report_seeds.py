"""``fedkt report RUN RUN ...``: mean ± sd over seeds, with hand-computed numbers."""

import json

import pytest
from typer.testing import CliRunner

from fedkt.cli import app
from fedkt.report_seeds import seeds_summary


def fake_run(path, seed, accs, threads=0, tasks=("arc_easy", "openbookqa"), methods=("zero_shot", "fedcollm")):
    """A run directory whose every method/role/task scores ``accs[task]`` (+0.1 for the LLM, +0.05 for fedcollm)."""
    path.mkdir(parents=True)
    def metrics(bump):
        return {t: {"acc": accs[t] + bump, "acc_norm": 0.0, "n": 500} for t in tasks}
    res = {"name": "exp", "fedkt_version": "0", "data": {"clients": [1], "aux": 0, "eval": {t: 500 for t in tasks}},
           "methods": {m: {"slm": metrics(0.05 * (m == "fedcollm")), "llm": metrics(0.1 + 0.05 * (m == "fedcollm"))}
                       for m in methods}}
    (path / "results.json").write_text(json.dumps(res))
    (path / "config.toml").write_text(f'name = "exp"\nseed = {seed}\n[model]\nthreads = {threads}\n')
    return path


def test_mean_and_sample_sd_per_method_role_task_and_average(tmp_path):
    dirs = [fake_run(tmp_path / f"s{s}", s, {"arc_easy": a, "openbookqa": o})
            for s, a, o in ((0, 0.40, 0.20), (1, 0.50, 0.20), (2, 0.60, 0.26))]
    text = seeds_summary(dirs)
    assert text.startswith("# exp: 3 seeds (0, 1, 2)")
    # SLM zero-shot: ARC-E 40/50/60 -> 50.0 ± 10.0; OBQA 20/20/26 -> 22.0 ± 3.5; avg 30/35/43 -> 36.0 ± 6.6
    assert "| Zero-shot | 50.0 ± 10.0 | 22.0 ± 3.5 | 36.0 ± 6.6 |" in text
    # FedCoLLM SLM = +5 everywhere; LLM zero-shot = +10, FedCoLLM LLM = +15 (sd unchanged)
    assert "| FedCoLLM | 55.0 ± 10.0 | 27.0 ± 3.5 | 41.0 ± 6.6 |" in text
    assert "| FedCoLLM | 65.0 ± 10.0 | 37.0 ± 3.5 | 51.0 ± 6.6 |" in text
    llm, slm = text.index("## Server LLM"), text.index("## Client SLMs")
    assert llm < text.index("| Zero-shot | 60.0 ± 10.0") < slm < text.index("| Zero-shot | 50.0 ± 10.0")
    assert "Configs differ only in the seed." in text


def test_methods_run_under_fewer_seeds_show_their_count_and_config_differences_are_named(tmp_path):
    a = fake_run(tmp_path / "a", 0, {"arc_easy": 0.4, "openbookqa": 0.2})
    b = fake_run(tmp_path / "b", 1, {"arc_easy": 0.5, "openbookqa": 0.3}, threads=1, methods=("zero_shot",))
    text = seeds_summary([a, b])
    assert "| FedCoLLM | 45.0 (n=1) | 25.0 (n=1) | 35.0 (n=1) |" in text
    assert "| Zero-shot | 45.0 ± 7.1 | 25.0 ± 7.1 | 35.0 ± 7.1 |" in text
    assert "Configs also differ in: model.threads." in text


def test_refuses_repeated_seeds_other_tasks_and_non_runs(tmp_path):
    a = fake_run(tmp_path / "a", 0, {"arc_easy": 0.4, "openbookqa": 0.2})
    b = fake_run(tmp_path / "b", 0, {"arc_easy": 0.5, "openbookqa": 0.3})
    c = fake_run(tmp_path / "c", 1, {"arc_easy": 0.5}, tasks=("arc_easy",))
    with pytest.raises(ValueError, match="both ran seed 0"):
        seeds_summary([a, b])
    with pytest.raises(ValueError, match="same tasks"):
        seeds_summary([a, c])
    with pytest.raises(FileNotFoundError, match="no results.json"):
        seeds_summary([a, tmp_path])
    with pytest.raises(ValueError, match="at least two"):
        seeds_summary([a])


def test_cli_prints_and_writes_the_summary(tmp_path):
    a = fake_run(tmp_path / "a", 0, {"arc_easy": 0.4, "openbookqa": 0.2})
    b = fake_run(tmp_path / "b", 1, {"arc_easy": 0.5, "openbookqa": 0.3})
    out = tmp_path / "seeds.md"
    r = CliRunner().invoke(app, ["report", str(a), str(b), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "| Zero-shot | 45.0 ± 7.1 |" in r.output and out.read_text() in r.output
    r = CliRunner().invoke(app, ["report", str(a), str(a)])
    assert r.exit_code == 2 and "both ran seed 0" in " ".join(r.output.replace("│", " ").split())
