"""Golden runs: a 2-round tiny FedAvg and FedCoLLM experiment (and, since issue 21, FedProx, FedCoT and a
1-round FDKT: the adapters of the server and of every client, per-client accuracies, and exact pins — token
counts, ε from the accountant, the text-DP audit, FDKT's stage counts) must reproduce the adapters, client losses,
distillation losses, accuracies and bytes recorded before the architecture refactor. If one of these
fails, behaviour changed: find out why; never re-record to make it pass.

What is compared exactly, and what within a measured tolerance
------------------------------------------------------------
Exact: the accuracies (discrete; no score of the 12 questions is near a tie on any code path measured) and
the bytes sent down. The bytes sent *up* may differ by a few bytes, because the clients' reply meta carries
float values (train loss) as JSON, whose shortest repr changes length with the last digits.

Float paths (float32 training and distillation) differ between CPUs in the 6th digit: the order of float
sums depends on the SIMD width and the thread split. ``benchmarks/golden_spread.py`` ran the golden
experiment under 9 code paths on one machine (1 and 2 threads; ``ATEN_CPU_CAPABILITY=default``/``avx2`` vs
the native AVX-512; ``MKL_ENABLE_INSTRUCTIONS=AVX2``/``SSE4_2``; ``MKL_CBWR=COMPATIBLE``;
``ONEDNN_MAX_CPU_ISA=AVX2``; all generic at once) and measured the largest deviation between any two:

=============  ============================================  ===============  =========
group          deviation measured as                         max spread       tolerance
=============  ============================================  ===============  =========
client_losses  relative                                      1.0e-5           1e-4
distill        relative                                      2.8e-5           3e-4
adapters       absolute, relative to the adapter's L1 norm   1.1e-6           1e-5
comm (up)      bytes per round                               3                16
=============  ============================================  ===============  =========

Generated text is discrete: FedCoT's and FDKT's goldens also record ``generated``, a fingerprint of every
text their models generated and every text-DP replacement drawn. Where another CPU flips a near-tie token
of a tiny random model, everything trained on the text moves; the run is then compared on its
text-independent pins only (``golden_helpers.TEXT_INDEPENDENT``) and skipped with that reason. Floats among
the exact pins (FDKT's filter margins) compare at the distillation tolerance. FedCoT's golden trains at
lr 0.003 (the others 0.03): at 0.03 its third client's second round amplified path differences 100x
(5.6e-4 x L1 under ``ATEN_CPU_CAPABILITY=default``, with identical texts); see golden_helpers.METHOD_SETS.

(An AMD EPYC machine, issue 18, deviated 2.1e-6 and 1.1e-6 in the client losses: inside the spread.)
The tolerances are ~10x the spread, and still 40-10,000x below the effect of a 1% change of the learning
rate (``test_golden_detects_a_one_percent_learning_rate_change`` proves the test goes red then).
"""

import copy
import json

import pytest
import torch

from golden_helpers import GOLDEN_DIR, TEXT_INDEPENDENT, make_golden_assets, run_golden

TEXTS_DIFFER = "generated texts differ on this CPU"

TOLERANCE = {"client_losses": 1e-4, "distill": 3e-4, "adapters": 1e-5}
UP_BYTES_TOLERANCE = 16


@pytest.fixture(scope="module")
def golden_assets(tmp_path_factory):
    return make_golden_assets(tmp_path_factory.mktemp("golden"))


def pins_equal(got, want) -> bool:
    """Exact, except floats among the pins (FDKT's filter margins: the LLM's log-likelihood differences),
    which are compared at the distillation losses' relative tolerance: their last digits follow the CPU's
    float sums (``ATEN_CPU_CAPABILITY=default`` moved them by 1e-5 relative)."""
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return got == want or abs(got - want) <= TOLERANCE["distill"] * abs(want)
    if isinstance(want, dict) and isinstance(got, dict):
        return set(got) == set(want) and all(pins_equal(got[k], want[k]) for k in want)
    if isinstance(want, list) and isinstance(got, list):
        return len(got) == len(want) and all(pins_equal(g, w) for g, w in zip(got, want))
    return got == want


def golden_mismatches(got: dict, want: dict, method: str = "") -> list[str]:
    """Every field of ``got`` outside its tolerance of ``want`` (empty: the run matches the golden).

    A run whose generated texts differ from the golden's (``generated``: another CPU flipped a near-tie
    token of a tiny random model) is compared on its text-independent pins only, and the first entry
    says so, starting with ``TEXTS_DIFFER``."""
    bad: list[str] = []
    if set(got) != set(want):
        return [f"fields {sorted(got)} != {sorted(want)}"]
    if got.get("generated") != want.get("generated"):
        if got["generated"]["calls"] != want["generated"]["calls"] or \
                got["generated"]["texts"] != want["generated"]["texts"]:
            return [f"generated: {got['generated']} != {want['generated']} (a different number of texts)"]
        keep = TEXT_INDEPENDENT[method]
        diff = [k for k in keep if not pins_equal(got["exact"].get(k), want["exact"].get(k))]
        return [f"{TEXTS_DIFFER}: compared only exact.{'/'.join(keep)}"] + \
            [f"exact: {diff} differ (exact)" for _ in diff[:1]]

    def rel_close(path, g, w, tol):
        if abs(g - w) > tol * abs(w):
            bad.append(f"{path}: {g!r} != {w!r} (relative tolerance {tol:g})")

    for key in ("client_losses",):
        if len(got[key]) != len(want[key]):
            bad.append(f"{key}: length {len(got[key])} != {len(want[key])}")
        for i, (g, w) in enumerate(zip(got[key], want[key])):
            rel_close(f"{key}[{i}]", g, w, TOLERANCE[key])
    for r, wfp in want["adapters"].items():
        gfp = got["adapters"].get(r, {})
        for name, w in wfp.items():
            g = gfp.get(name, float("nan"))
            if not abs(g - w) <= TOLERANCE["adapters"] * wfp["abs"]:
                bad.append(f"adapters.{r}.{name}: {g!r} != {w!r} (tolerance {TOLERANCE['adapters']:g} x L1 "
                           f"{wfp['abs']:.3f})")
    if got["acc"] != want["acc"]:
        bad.append(f"acc: {got['acc']} != {want['acc']} (exact)")
    if len(got["distill"]) != len(want["distill"]):
        bad.append("distill: number of rounds differs")
    for i, (g, w) in enumerate(zip(got["distill"], want["distill"])):
        if set(g) != set(w):
            bad.append(f"distill[{i}]: keys {sorted(g)} != {sorted(w)}")
            continue
        for k in w:
            rel_close(f"distill[{i}].{k}", g[k], w[k], TOLERANCE["distill"])
    ge, we = got.get("exact", {}), want.get("exact", {})
    diff = sorted(k for k in set(ge) | set(we) if not pins_equal(ge.get(k), we.get(k)))
    if diff:
        bad.append(f"exact: {diff} differ (exact)")
    if len(got["comm"]) != len(want["comm"]):
        bad.append("comm: number of rounds differs")
    for i, ((gu, gd), (wu, wd)) in enumerate(zip(got["comm"], want["comm"])):
        if gd != wd:
            bad.append(f"comm[{i}] down bytes: {gd} != {wd} (exact)")
        if abs(gu - wu) > UP_BYTES_TOLERANCE:
            bad.append(f"comm[{i}] up bytes: {gu} != {wu} (± {UP_BYTES_TOLERANCE})")
    return bad


def test_golden_comparison_is_exact_where_the_maths_is():
    want = json.loads((GOLDEN_DIR / "fedcollm.json").read_text())
    assert golden_mismatches(copy.deepcopy(want), want) == []
    for edit, field in ((lambda d: d["acc"][1]["slm"].__setitem__("acc", 0.5833333333333334), "acc"),
                        (lambda d: d["comm"][0].__setitem__(1, d["comm"][0][1] + 1), "comm[0] down"),
                        (lambda d: d["comm"][0].__setitem__(0, d["comm"][0][0] + 17), "comm[0] up"),
                        (lambda d: d["client_losses"].__setitem__(5, d["client_losses"][5] * (1 + 2e-4)),
                         "client_losses[5]"),
                        (lambda d: d["adapters"]["llm"].__setitem__("sq", d["adapters"]["llm"]["sq"] + 0.01),
                         "adapters.llm.sq"),
                        (lambda d: d["distill"][0].__setitem__("kl_f_last", 3.52), "distill[0].kl_f_last")):
        got = copy.deepcopy(want)
        edit(got)
        bad = golden_mismatches(got, want)
        assert len(bad) == 1 and bad[0].startswith(field), bad
    # a float deviation inside the tolerance passes
    got = copy.deepcopy(want)
    got["client_losses"][5] *= 1 + 5e-5
    got["comm"][1][0] += 3
    assert golden_mismatches(got, want) == []


@pytest.mark.parametrize("method", ["fedavg", "fedcollm", "fedprox", "fedcot", "fdkt"])
def test_golden_run(tmp_path, golden_assets, method, monkeypatch):
    monkeypatch.setenv("FEDKT_CACHE", str(tmp_path / "cache"))
    dirs, data = golden_assets
    want = json.loads((GOLDEN_DIR / f"{method}.json").read_text())
    got = run_golden(tmp_path, dirs, data, method)
    bad = golden_mismatches(got, want, method)
    if bad[:1] and bad[0].startswith(TEXTS_DIFFER) and len(bad) == 1:
        pytest.skip(f"{method}: {bad[0]} (the text-independent pins match; every field matches on the CPUs "
                    f"where the texts do)")
    assert bad == []
    if method in ("fedavg", "fedcollm"):
        assert len(got["client_losses"]) == 6  # 3 clients x 2 rounds


def test_golden_detects_a_one_percent_learning_rate_change(tmp_path, golden_assets):
    """The tolerances are loose enough for any CPU and tight enough for a real change: lr x 1.01 is red."""
    dirs, data = golden_assets
    want = json.loads((GOLDEN_DIR / "fedavg.json").read_text())
    got = run_golden(tmp_path, dirs, data, "fedavg", extra_sets=["train.lr=0.0303"])
    bad = golden_mismatches(got, want)
    assert any(b.startswith("client_losses[3]") for b in bad), bad
    assert any(b.startswith("adapters.slm.sq") for b in bad), bad


def test_next_round_broadcasts_exactly_the_distilled_slm_adapter(tmp_path, golden_assets, monkeypatch):
    """Round r+1's "fit" payload is θ after round r's distillation (not the pre-distillation FedAvg)."""
    from safetensors.torch import load_file

    from fedkt.federation import codec
    from golden_helpers import golden_config
    from fedkt.experiment import run_experiment

    sent = []
    orig = codec.encode

    def recording(msg):
        if msg.meta.get("round") == 2 and msg.tensors and "epochs" in msg.meta:
            sent.append({k: v.clone() for k, v in msg.tensors.items()})
        return orig(msg)

    monkeypatch.setattr(codec, "encode", recording)
    dirs, data = golden_assets
    run_experiment(golden_config(dirs, data, ["fedcollm"]), tmp_path / "r")
    distilled = load_file(str(tmp_path / "r" / "checkpoints" / "fedcollm" / "round_001" / "slm.safetensors"))
    assert len(sent) == 3  # one per client
    for payload in sent:
        assert payload.keys() == distilled.keys()
        assert all(torch.equal(payload[k], distilled[k]) for k in distilled)
