"""How far the golden runs' float numbers move between CPU code paths: the measurement behind the
tolerances in tests/test_golden.py.

Runs the golden experiment (tests/golden_helpers.py) once per code-path variant, each in a fresh process
(thread count; ATen's kernel level ``ATEN_CPU_CAPABILITY``; MKL's instruction set ``MKL_ENABLE_INSTRUCTIONS``
and its reproducibility mode ``MKL_CBWR``; oneDNN's ``ONEDNN_MAX_CPU_ISA``), and prints per golden field the
largest relative deviation from the recorded golden and between variants. A variant the CPU cannot run
(e.g. AVX-512 on an AVX2 machine) falls back silently in the libraries; the capability each process really
used is printed.

Then it applies the test's own verdict (``test_golden.golden_mismatches``) to every method under every
variant and prints the fields outside tolerance (none: the goldens hold on that code path).

    OMP_NUM_THREADS=1 python benchmarks/golden_spread.py [--variants NAME,NAME] [--methods fedcot,fdkt]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"

VARIANTS: dict[str, dict[str, str]] = {
    "native-2t": {"THREADS": "2"},
    "native-1t": {"THREADS": "1"},
    "aten-default": {"THREADS": "2", "ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2"},
    "mkl-avx2": {"THREADS": "2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "mkl-sse42": {"THREADS": "2", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "mkl-cbwr-compat": {"THREADS": "2", "MKL_CBWR": "COMPATIBLE"},
    "onednn-avx2": {"THREADS": "2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "all-generic-1t": {"THREADS": "1", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                       "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}

CHILD = r"""
import json, os, sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
torch.set_num_threads({threads})
from golden_helpers import make_golden_assets, run_golden
root = Path(tempfile.mkdtemp())
dirs, data = make_golden_assets(root)
os.environ["FEDKT_CACHE"] = str(root / "cache")
out = {{m: run_golden(root, dirs, data, m) for m in {methods!r}}}
out["_capability"] = torch.backends.cpu.get_cpu_capability()
print("GOLDEN-JSON " + json.dumps(out))
"""


METHODS = ("fedavg", "fedcollm", "fedprox", "fedcot", "fdkt")


def run_variant(env_over: dict[str, str], methods=METHODS) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    threads = env_over.get("THREADS", "2")
    env.update({k: v for k, v in env_over.items() if k != "THREADS"})
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""))
    code = CHILD.format(tests=str(TESTS), threads=int(threads), methods=tuple(methods))
    with tempfile.TemporaryDirectory() as cwd:
        res = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    line = next(x for x in res.stdout.splitlines() if x.startswith("GOLDEN-JSON "))
    return json.loads(line[len("GOLDEN-JSON "):])


def leaves(obj, path=""):
    """(path, value) for every number in a golden outcome."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def field_of(path: str) -> str:
    """The tolerance group of a leaf: client_losses, adapters, distill, acc, comm."""
    return path.split(".", 1)[1].split("[", 1)[0].split(".", 1)[0]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    methods = args.methods.split(",")
    sys.path.insert(0, str(TESTS))
    from test_golden import golden_mismatches

    recorded = {m: json.loads((TESTS / "golden" / f"{m}.json").read_text()) for m in methods}
    results = {}
    for name in args.variants.split(","):
        res = run_variant(VARIANTS[name], methods)
        print(f"{name:16s} capability={res.pop('_capability')}", flush=True)
        for m in methods:
            bad = golden_mismatches(res[m], recorded[m], m)
            print(f"    {m:9s} {'matches the golden' if not bad else '; '.join(bad)[:300]}", flush=True)
        results[name] = res
    want = dict(leaves(recorded))
    spread: dict[str, dict[str, float]] = {}
    for name, res in results.items():
        for path, v in leaves(res):
            w = want[path]
            g = field_of(path)
            s = spread.setdefault(g, {"vs_recorded": 0.0, "between_variants": 0.0, "exact_mismatch": 0})
            if isinstance(w, float):
                s["vs_recorded"] = max(s["vs_recorded"], rel(v, w))
                for other in results.values():
                    s["between_variants"] = max(s["between_variants"], rel(v, dict(leaves(other))[path]))
            elif v != w:
                s["exact_mismatch"] += 1
    print(f"\n{'field':15s} {'max rel vs recorded':>20s} {'max rel between':>16s} {'exact mismatches':>17s}")
    for g, s in sorted(spread.items()):
        print(f"{g:15s} {s['vs_recorded']:20.2e} {s['between_variants']:16.2e} {s['exact_mismatch']:17d}")
    if args.json:
        Path(args.json).write_text(json.dumps({"spread": spread, "results": results}, indent=1))


if __name__ == "__main__":
    main()
