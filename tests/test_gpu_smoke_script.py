"""benchmarks/gpu_smoke.py is the script a GPU owner runs first (docs/devices.md, docs/gpu.md), and it has never
had a GPU here: it must at least keep running. On this CPU it runs one round of two methods on the tiny random
pair in bf16 and reports each method's tokens, tokens/s and peak memory, with the line that says no
accelerator was found."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="asserts the CPU fallback's report")
def test_gpu_smoke_runs_and_reports_on_the_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--methods", "zero_shot,fedavg",
                           "--dtype", "bf16", "--clients", "2", "--per-client", "4", "--questions", "8",
                           "--json", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "no accelerator found" in proc.stdout
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "bf16"
    assert [r["method"] for r in report["rows"]] == ["zero_shot", "fedavg"]
    for r in report["rows"]:
        assert r["error"] == "" and r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["peak_mib"] > 0, r
        assert r["memory"] == "peak RSS"
    # zero-shot scores the 8 questions with both models (2 x E tokens, same tokenizer); FedAvg trains (T) and
    # scores them with the SLM (E): the counter sees training when T + E > E
    assert report["rows"][1]["tokens"] > report["rows"][0]["tokens"] // 2
