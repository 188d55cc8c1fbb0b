"""Per-question correctness in results.json and the paired differences of report.md and ``fedkt report RUN
RUN``: a tiny run's bit-strings against evaluate's own per-question predictions, and report rows against
hand-computed differences and McNemar / sign-test p-values."""

import json
import math

import pytest

from fedkt.paired import pool
from fedkt.report import render
from fedkt.report_paired import N_BOOT, NO_DATA, per_question
from fedkt.report_seeds import seeds_summary
from fedkt.reply_schemas import correctness
from fedkt.run_results import RunResults, bits, ids_fingerprint, question_ids, unbits


def _predicted(model, tok, exs):
    """Each question's acc / acc_norm correctness straight from evaluate's per-question predictions."""
    from fedkt.evaluate import choice_loglikelihoods, predictions

    out = [predictions(ex, lls) for ex, lls in zip(exs, choice_loglikelihoods(model, tok, exs, batch_size=16))]
    return bits(p == ex.answer for (p, _), ex in zip(out, exs)), bits(q == ex.answer for (_, q), ex in zip(out, exs))


def test_tiny_run_records_ids_and_correctness_matching_evaluate(tmp_path, model_dirs, data_dir):
    from peft import PeftModel

    from fedkt.data.tasks import load_task
    from fedkt.experiment import run_experiment
    from fedkt.models import load_model
    from test_runs import tiny_config

    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["zero_shot", "standalone", "fedavg"])
    res = run_experiment(cfg, tmp_path / "r")
    exs = load_task("arc_easy", "test", data_dir)
    ids = [f"q{i}" for i in range(1000, 1012)]
    assert res["questions"] == {"arc_easy": ids}
    fp = ids_fingerprint(ids)

    def check(got, model, tok, metrics):
        acc, acc_norm = _predicted(model, tok, exs)
        assert got == {"ids": fp, "acc": acc, "acc_norm": acc_norm}
        assert metrics["acc"] == pytest.approx(acc.count("1") / 12) and metrics["acc_norm"] == pytest.approx(
            acc_norm.count("1") / 12)

    m = res["methods"]
    base, tok = load_model(str(model_dirs["slm"]))
    check(m["zero_shot"]["correct"]["slm"]["arc_easy"], base, tok, m["zero_shot"]["slm"]["arc_easy"])
    fedavg = PeftModel.from_pretrained(base, str(tmp_path / "r" / "adapters" / "fedavg" / "slm"))
    check(m["fedavg"]["correct"]["slm"]["arc_easy"], fedavg, tok, m["fedavg"]["slm"]["arc_easy"])
    assert m["fedavg"]["per_round"][-1]["correct"] == m["fedavg"]["correct"]
    run = RunResults.from_dict(res)
    assert per_question(run, "fedavg", "slm", round=2) == per_question(run, "fedavg", "slm")
    r1 = m["fedavg"]["per_round"][0]["correct"]["slm"]["arc_easy"]["acc"]
    assert per_question(run, "fedavg", "slm", round=1)["arc_easy"] == {i: float(c) for i, c in zip(ids, r1)}
    assert per_question(run, "fedavg", "slm", round=3) is None
    assert [set(e["correct"]) for e in m["fedavg"]["per_round"]] == [{"slm"}, {"slm"}]
    # standalone: each client's own adapter, as the client scored it
    assert set(m["standalone"]["per_client_correct"]) == {"client0", "client1", "client2"}
    for cid, got in m["standalone"]["per_client_correct"].items():
        base, tok = load_model(str(model_dirs["slm"]))
        own = PeftModel.from_pretrained(base, str(tmp_path / "r" / "clients" / cid / "standalone" / "slm"))
        check(got["arc_easy"], own, tok, m["standalone"]["per_client"][cid]["arc_easy"])
    assert "correct" not in m["standalone"]
    # report.md's row: the difference of the bit-strings, McNemar on their discordant questions
    a, b = unbits(m["fedavg"]["correct"]["slm"]["arc_easy"]["acc"]), unbits(m["zero_shot"]["correct"]["slm"]["arc_easy"]["acc"])
    a_only, b_only = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    d = pool([(a, b)], n_boot=N_BOOT)
    assert (d.a_only, d.b_only, d.diff) == (a_only, b_only, (a_only - b_only) / 12)
    report = (tmp_path / "r" / "report.md").read_text()
    assert f"| FedAvg − Zero-shot | {100 * d.diff:+.1f} [{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}]" in report
    assert "| Standalone − Zero-shot |" in report and "| FedAvg − Standalone |" in report


def test_per_question_off_records_nothing_and_the_report_says_why(tmp_path, model_dirs, data_dir):
    from fedkt.experiment import run_experiment
    from test_runs import tiny_config

    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["zero_shot"], **{"eval.per_question": "false"})
    res = run_experiment(cfg, tmp_path / "r")
    assert "questions" not in res and "correct" not in res["methods"]["zero_shot"]
    assert NO_DATA in (tmp_path / "r" / "report.md").read_text()


def results(methods, questions):
    return {"name": "hand", "fedkt_version": "0", "data": {"clients": [5, 5], "aux": 0,
                                                           "eval": {t: len(q) for t, q in questions.items()}},
            "questions": questions, "methods": methods}


def mc(bitstr, ids):
    return {"ids": ids_fingerprint(ids), "acc": bitstr, "acc_norm": "0" * len(bitstr)}


def metrics(bitstrs: dict):
    return {t: {"acc": b.count("1") / len(b), "acc_norm": 0.0, "n": len(b)} for t, b in bitstrs.items()}


ARC = [f"arc{i}" for i in range(10)]
OBQA = ["o1", "o2", "o3", "o4"]


def hand_run():
    """ARC-E, 10 questions: FedCoLLM right on 1-8, zero-shot on 1-5 and 10 -> 3 vs 1 discordant: +20.0 points,
    McNemar p = 2 (C(4,0) + C(4,1)) / 2^4 = 0.625. OBQA, 4 questions: zero-shot 0000, FedCoLLM 1100 (+50.0,
    p = 2 / 2^2 = 0.5); the two standalone clients 1100 and 1010 -> per question 1, .5, .5, 0: +50.0 over zero-shot, sign test 3 vs 0:
    p = 2 / 2^3 = 0.25."""
    zs = {"arc_easy": "1111100001", "openbookqa": "0000"}
    fc = {"arc_easy": "1111111100", "openbookqa": "1100"}
    c0 = {"arc_easy": "1111100001", "openbookqa": "1100"}
    c1 = {"arc_easy": "1111100001", "openbookqa": "1010"}
    ids = {"arc_easy": ARC, "openbookqa": OBQA}
    corr = lambda bs: {t: mc(b, ids[t]) for t, b in bs.items()}  # noqa: E731
    methods = {
        "zero_shot": {"slm": metrics(zs), "correct": {"slm": corr(zs)}},
        "standalone": {"slm": metrics({"arc_easy": "1111100001", "openbookqa": "1100"}),
                       "per_client": {"client0": metrics(c0), "client1": metrics(c1)},
                       "per_client_correct": {"client0": corr(c0), "client1": corr(c1)}},
        "fedcollm": {"slm": metrics(fc), "correct": {"slm": corr(fc)}},
    }
    return results(methods, ids)


def test_report_rows_equal_hand_computed_differences_and_p_values():
    text = render(hand_run())
    row = next(line for line in text.splitlines() if line.startswith("| FedCoLLM − Zero-shot |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].startswith("+20.0 [") and cells[1].endswith("p=0.62")  # 0.625
    assert cells[2].startswith("+50.0 [") and cells[2].endswith("p=0.50")  # 2 vs 0: 2 / 2^2
    # All: 14 questions, differences summing to 2 + 2 -> +28.6; discordant 3 + 2 vs 1 -> p = 2 * 7/64
    assert cells[3].startswith("+28.6 [") and cells[3].endswith("p=0.22")
    arc = pool([([1] * 8 + [0, 0], [1] * 5 + [0] * 4 + [1])], n_boot=N_BOOT)
    assert cells[1] == f"+20.0 [{100 * arc.ci_low:+.1f}, {100 * arc.ci_high:+.1f}] p=0.62"
    # standalone: the share of clients right per question; ARC-E equal to zero-shot on every question
    row = next(line for line in text.splitlines() if line.startswith("| Standalone − Zero-shot |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "+0.0 [+0.0, +0.0] p=1.00"
    # OBQA: d = 1, .5, .5, 0 -> clustered McNemar X² = 2² / 1.5, p = P(χ²₁ > 8/3) = 0.10; the bootstrap
    # interval excludes 0 (a resample of 4 questions has mean 0 with probability 1/256 only): bold
    assert math.erfc(math.sqrt(8 / 3 / 2)) == pytest.approx(0.1025, abs=1e-4)
    assert cells[2].startswith("**+50.0 [+") and cells[2].endswith("p=0.10**")
    assert cells[3].startswith("**+14.3 [+") and cells[3].endswith("p=0.10**")  # All: 2 / 14, same X²
    assert "| FedCoLLM − Standalone |" in text and "| Zero-shot − Standalone |" not in text
    r = RunResults.from_dict(hand_run())
    assert per_question(r, "standalone", "slm")["openbookqa"] == {"o1": 1.0, "o2": 0.5, "o3": 0.5, "o4": 0.0}


def test_old_results_without_per_question_data_still_report():
    old = hand_run()
    del old["questions"]
    for m in old["methods"].values():
        m.pop("correct", None)
        m.pop("per_client_correct", None)
    text = render(old)
    assert "| FedCoLLM | 80.0 (0.0) | 50.0 (0.0) | 65.0 |" in text
    assert NO_DATA in text and "Paired differences\n" not in text
    # a run resumed across the change: the method without it is named, the others compared
    mixed = hand_run()
    del mixed["methods"]["standalone"]["per_client_correct"]
    text = render(mixed)
    assert "| FedCoLLM − Zero-shot |" in text and "| FedCoLLM − Standalone |" not in text
    assert "Not in the paired tables (no per-question correctness recorded): Standalone." in text


def fake_seed_run(path, seed, ids, zs, fc):
    path.mkdir(parents=True)
    corr = lambda b: {"arc_easy": mc(b, ids)}  # noqa: E731
    res = results({"zero_shot": {"slm": metrics({"arc_easy": zs}), "correct": {"slm": corr(zs)}},
                   "fedcollm": {"slm": metrics({"arc_easy": fc}), "correct": {"slm": corr(fc)}}}, {"arc_easy": ids})
    (path / "results.json").write_text(json.dumps(res))
    (path / "config.toml").write_text(f'name = "hand"\nseed = {seed}\n')
    return path


def test_seeds_report_pools_paired_differences_over_runs_of_different_questions(tmp_path):
    """Seed 0 scores q1-q4 (FedCoLLM 1111, zero-shot 0011: +2), seed 1 scores q3-q6 (1000 vs 0001: 0); pooled
    over 8 question-runs: +25.0, 3 vs 1 discordant -> p = 0.625; the interval resamples within each run."""
    a = fake_seed_run(tmp_path / "s0", 0, ["q1", "q2", "q3", "q4"], "0011", "1111")
    b = fake_seed_run(tmp_path / "s1", 1, ["q3", "q4", "q5", "q6"], "0001", "1000")
    text = seeds_summary([a, b])
    want = pool([([1, 1, 1, 1], [0, 0, 1, 1]), ([1, 0, 0, 0], [0, 0, 0, 1])], n_boot=N_BOOT)
    assert (want.diff, want.a_only, want.b_only, want.n) == (0.25, 3, 1, 8)
    cell = f"+25.0 [{100 * want.ci_low:+.1f}, {100 * want.ci_high:+.1f}] p=0.62"
    assert f"| FedCoLLM − Zero-shot | {cell} | {cell} |" in text
    assert "| FedCoLLM | 62.5 ± 53.0 | 62.5 ± 53.0 |" in text  # the mean ± sd table stays
    assert text.index("± sd") < text.index("## Paired differences")
    # a third seed without per-question data: the pooled row says on how many runs it stands
    c = tmp_path / "s2"
    c.mkdir()
    old = json.loads((a / "results.json").read_text())
    old.pop("questions")
    (c / "results.json").write_text(json.dumps(old))
    (c / "config.toml").write_text('name = "hand"\nseed = 2\n')
    text = seeds_summary([a, b, c])
    assert f"| FedCoLLM − Zero-shot (n=2) | {cell} | {cell} |" in text
    assert "no per-question correctness recorded in some runs): FedCoLLM, Zero-shot." in text


def test_ids_bits_and_the_reply_check():
    class Ex:
        def __init__(self, i):
            self.id = i

    assert question_ids([Ex("a"), Ex("b"), Ex("a"), Ex("a")]) == ["a", "b", "a#2", "a#3"]
    assert bits([True, False, True]) == "101" and unbits("101") == [True, False, True]
    with pytest.raises(ValueError, match="only 0 and 1"):
        unbits("1x1")
    ok = {"arc_easy": {"ids": "abc", "acc": "0101", "acc_norm": "1111"}}
    assert correctness(ok)
    assert not correctness({"arc_easy": {"ids": "abc", "acc": "0101", "acc_norm": "111"}})  # lengths differ
    assert not correctness({"arc_easy": {"ids": "abc", "acc": "01x1"}})
    assert not correctness({"arc_easy": {"acc": "0101"}})  # no ids
    assert not correctness({"arc_easy": {"ids": "abc"}})


def test_server_leaves_out_a_client_scored_on_other_questions(tmp_path):
    from fedkt.config import ExperimentConfig
    from fedkt.data.tasks import Example
    from fedkt.federation.base import Message
    from fedkt.server import ServerContext

    exs = [Example(task="arc_easy", id=f"q{i}", question="?", choices=("a", "b"), answer=0) for i in range(3)]
    server = ServerContext(cfg=ExperimentConfig(), out=tmp_path, open_federation=None, eval_sets={"arc_easy": exs})
    good = {"arc_easy": {"ids": ids_fingerprint(["q0", "q1", "q2"]), "acc": "101"}}
    other = {"arc_easy": {"ids": ids_fingerprint(["q0", "q1", "q9"]), "acc": "101"}}
    got = server.client_correct({"c0": Message(meta={"correct": good}), "c1": Message(meta={"correct": other}),
                                 "c2": Message(meta={})})
    assert got == {"c0": good}
    assert server.client_correct({"c2": Message(meta={})}) is None


def test_fedcot_paper_mode_records_each_clients_correctness_per_round(tmp_path, model_dirs, data_dir, monkeypatch):
    """FedCoT's paper mode: the clients evaluate their own SLMs every round and send one 0/1 per question
    besides the metrics; each round's entry keeps them per client, the method's final ones are round 2's, and
    each string's mean is the client's reported accuracy."""
    from fedkt.experiment import run_experiment
    from test_runs import tiny_config

    monkeypatch.setenv("FEDKT_CACHE", str(tmp_path / "cache"))
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedcot"], llm=True, **{
        "fedcot.kit_neighbors": 8, "fedcot.rationale_tokens": 6, "fedcot.decode_tokens": 6, "fedcot.epsilon": 2.0,
        "fedcot.attack_prompts": 0})
    res = run_experiment(cfg, tmp_path / "r")
    m = res["methods"]["fedcot"]
    fp = ids_fingerprint(res["questions"]["arc_easy"])
    for entry in m["per_round"]:
        assert set(entry["per_client_correct"]) == {"client0", "client1", "client2"} and "correct" not in entry
        for cid, c in entry["per_client_correct"].items():
            got = c["arc_easy"]
            assert got["ids"] == fp and len(got["acc"]) == 12
            assert entry["per_client"][cid]["arc_easy"]["acc"] == pytest.approx(got["acc"].count("1") / 12)
    assert m["per_client_correct"] == m["per_round"][-1]["per_client_correct"]
    shares = per_question(RunResults.from_dict(res), "fedcot", "slm")["arc_easy"]
    assert sum(shares.values()) / 12 == pytest.approx(m["slm"]["arc_easy"]["acc"])
