"""bf16-checked scoring (eval.precision = "bf16-checked"): the full-precision predictions from bf16 scores
plus full-precision re-scoring of the close calls."""

import math

import pytest
import torch

from fedkt import eval_checked as ec
from fedkt.config import ConfigError, EvalConfig
from fedkt.data.prompts import per_char
from fedkt.data.tasks import parse_row
from fedkt.evaluate import choice_loglikelihoods, evaluate_tasks, predictions
from fedkt.models import load_model

from conftest import MC_ROWS


def _questions(n: int, lettered: bool = False) -> list:
    words = ["is", "so", "to", "Wh"]  # one token each after a space in the test tokenizer
    out = []
    for i in range(n):
        q, ch, k = MC_ROWS[i % len(MC_ROWS)]
        ch = words[:len(ch)] if lettered else ch
        row = {"id": str(i), "question": f"{q} ({i})", "answerKey": k,
               "choices": {"text": ch, "label": [chr(65 + j) for j in range(len(ch))]}}
        out.append(parse_row(row, "arc_easy", str(i)))
    return out


def test_margin_shift_and_calibration_by_hand():
    assert ec.margin([1.0, 3.0, 2.5]) == 0.5
    assert ec.margin([2.0, 2.0]) == 0.0 and ec.margin([1.0]) == math.inf
    assert math.isnan(ec.margin([1.0, math.nan])) and math.isnan(ec.margin([-math.inf, 0.0]))
    # differences a - b: [-0.5, 0, 1]; the pair (choice 0, choice 2) moved by 1.5
    assert ec.shift([1.0, 2.0, 3.0], [1.5, 2.0, 2.0]) == 1.5
    assert ec.shift([1.0, 2.0], [2.0, 3.0]) == 0.0  # a common offset (the normaliser) moves no margin
    assert ec.calibration_indices(5, 32) == [0, 1, 2, 3, 4]
    idx = ec.calibration_indices(100, 32)
    assert len(idx) == 32 and idx[0] == 0 and idx[-1] == 96 and idx == sorted(set(idx))


class Table(torch.nn.Module):
    """A stand-in model whose scores are a table: fp32 ``exact``, bf16 ``low`` (as its bf16 copy would)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(2, 2)
        self.lin = torch.nn.Linear(2, 2)

    def get_input_embeddings(self):
        return self.emb


def _table_scorer(exact, low, calls):
    def score(model, tok, exs, desc):
        table = low if model.lin.weight.dtype == torch.bfloat16 else exact
        calls.append((desc, len(exs), model.lin.weight.dtype))
        return [table[int(e.id)] for e in exs]
    return score


def test_close_calls_are_rescored_and_flips_caught():
    """40 questions, fp32 scores with margins 0.05..10; bf16 moves every margin by up to 0.1 and flips the
    close ones. The 32-question sample measures the shift, questions under 4x it are re-scored: every
    prediction is fp32's, and only the close ones paid for fp32 again."""
    g = torch.Generator().manual_seed(0)
    exs = _questions(40)
    exact, low = {}, {}
    for i, e in enumerate(exs):
        k = len(e.choices)
        base = (-torch.rand(k, generator=g) * 3 - 2).tolist()
        best = max(range(k), key=base.__getitem__)
        runner = max(base[j] for j in range(k) if j != best)
        base[best] = runner + 0.05 + 9.95 * (i % 8) / 7  # margins 0.05 .. 10.0
        exact[i] = base
        noise = ((torch.rand(k, generator=g) - 0.5) * 0.1).tolist()
        low[i] = [v + d - 0.3 for v, d in zip(base, noise)]  # a common offset and a +-0.05 shift each
        if i % 8 == 0:  # the closest calls: bf16 flips them
            low[i][best] -= 0.2
    calls = []
    st = ec.CheckStats()
    got = ec.checked_choice_loglikelihoods(Table(), None, exs, _table_scorer(exact, low, calls), stats=st,
                                           require_hardware=False)
    flipped = [i for i in range(40) if predictions(exs[i], low[i])[0] != predictions(exs[i], exact[i])[0]]
    assert flipped  # unchecked bf16 would change predictions
    assert [predictions(e, s) for e, s in zip(exs, got)] == [predictions(e, exact[i]) for i, e in enumerate(exs)]
    cal = ec.calibration_indices(40)
    assert st.calibration == 32 and st.n == 40 and st.checked and 0 < st.close <= 8
    assert st.shift == pytest.approx(max(ec.shift(low[i], exact[i]) for i in cal))
    assert st.bar == pytest.approx(4 * st.shift)
    again = [i for i in range(40) if i not in cal and not (
        ec.margin(low[i]) >= st.bar and ec.margin(per_char(exs[i], low[i])) >= st.bar_norm)]
    assert st.rescored == len(again) and 0 < len(again) < 40 - 32
    for i in range(40):  # fp32 scores where checked or sampled, bf16's elsewhere
        assert got[i] == (exact[i] if i in cal or i in again else low[i])
    # the sample both ways, the rest in bf16, the close calls again in fp32
    assert calls == [("bf16 sample", 32, torch.bfloat16), ("fp32 sample", 32, torch.float32),
                     ("bf16", 8, torch.bfloat16), ("fp32 re-score", len(again), torch.float32)]


def test_too_many_close_calls_score_the_rest_in_fp32():
    """Margins mostly under the bar (more than a quarter of the sample): no bf16 pass over the rest, every
    score is fp32's."""
    exs = _questions(40)
    exact = {i: [0.0, -0.01 * (i % 3 + 1), -2.0, -3.0][:len(e.choices)] for i, e in enumerate(exs)}
    low = {i: [v + 0.02 * (j == 1) for j, v in enumerate(exact[i])] for i in exact}
    calls, st = [], ec.CheckStats()
    got = ec.checked_choice_loglikelihoods(Table(), None, exs, _table_scorer(exact, low, calls), stats=st,
                                           require_hardware=False)
    assert got == [exact[i] for i in range(40)] and not st.checked and st.close == 32
    assert calls == [("bf16 sample", 32, torch.bfloat16), ("fp32 sample", 32, torch.float32),
                     ("fp32", 8, torch.float32)]


def test_a_shift_beyond_the_bar_is_not_caught():
    """The guarantee's limit, pinned: a question outside the sample whose bf16 margin moved more than 4x the
    sample's worst shift keeps its bf16 (wrong) prediction. On real models the sample's worst shift is close
    to the whole set's (docs/evaluation.md), so a 4x bar leaves room."""
    exs = _questions(40)
    exact = {i: [0.0, -1.0, -2.0, -3.0][:len(e.choices)] for i, e in enumerate(exs)}
    low = {i: [v + 0.01 * (j == 0) for j, v in enumerate(exact[i])] for i in exact}
    low[34] = [-2.0, -1.0, -2.0, -3.0][:len(exs[34].choices)]  # outside the sample: moved by 2.0
    assert 34 not in ec.calibration_indices(40)
    got = ec.checked_choice_loglikelihoods(Table(), None, exs, _table_scorer(exact, low, []), require_hardware=False)
    assert predictions(exs[34], got[34]) != predictions(exs[34], exact[34])


def test_real_model_same_predictions_as_fp32(model_dirs, tok):
    """The tiny LLM (letters near-uniform): checked scoring gives fp32's
    predictions on choice-text and lettered questions alike, with ``worth=1`` (never falls back to fp32)
    and by default."""
    model, _ = load_model(str(model_dirs["llm"]))
    fast = ec.bf16_copy(model)
    layer = fast.model.layers[0]
    assert layer.mlp.up_proj.weight.dtype == layer.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert fast.lm_head.weight.dtype == fast.model.embed_tokens.weight.dtype == torch.float32
    assert layer.input_layernorm.weight.dtype == torch.float32
    # what stays fp32 is shared with the model, not copied
    assert layer.input_layernorm.weight is model.model.layers[0].input_layernorm.weight
    assert fast.model.embed_tokens.weight is model.model.embed_tokens.weight
    for lettered in (False, True):
        exs = _questions(48, lettered)
        exact = choice_loglikelihoods(model, tok, exs, batch_size=8)
        raw = choice_loglikelihoods(fast, tok, exs, batch_size=8)
        st = ec.CheckStats()
        got = ec.checked_choice_loglikelihoods(
            model, tok, exs, lambda m, t, q, d: choice_loglikelihoods(m, t, q, 8, d), stats=st,
            require_hardware=False, worth=1.0)
        assert [predictions(e, s) for e, s in zip(exs, got)] == [predictions(e, x) for e, x in zip(exs, exact)]
        assert st.checked and st.calibration == 32 and st.shift > 0
        # the letters' margins are a few thousandths here: some fall under the bar and are re-scored
        assert st.rescored > 0 if lettered else st.rescored == 0
        for i, (s, r, x) in enumerate(zip(got, raw, exact)):
            assert s == r or torch.allclose(torch.tensor(s), torch.tensor(x), atol=1e-5), i
        assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is untouched
        st = ec.CheckStats()
        dflt = ec.checked_choice_loglikelihoods(
            model, tok, exs, lambda m, t, q, d: choice_loglikelihoods(m, t, q, 8, d), stats=st,
            require_hardware=False)
        assert [predictions(e, s) for e, s in zip(exs, dflt)] == [predictions(e, x) for e, x in zip(exs, exact)]
        assert st.checked and st.close <= 8  # few close calls in the sample: the bf16 path


def test_evaluate_tasks_plumbs_precision(model_dirs, tok, monkeypatch):
    model, _ = load_model(str(model_dirs["llm"]))
    sets = {"arc_easy": _questions(40)}
    ref_correct, got_correct = {}, {}
    ref = evaluate_tasks(model, tok, sets, batch_size=8, correct=ref_correct)
    monkeypatch.setattr(ec, "worth_checking", lambda m: True)  # as on a CPU with AMX, or a GPU
    seen = []
    real = ec.checked_choice_loglikelihoods
    monkeypatch.setattr(ec, "checked_choice_loglikelihoods", lambda *a, **k: seen.append(1) or real(*a, **k))
    got = evaluate_tasks(model, tok, sets, batch_size=8, correct=got_correct, precision="bf16-checked")
    assert seen and got == ref and got_correct == ref_correct


def test_no_bf16_hardware_scores_in_fp32(model_dirs, tok, monkeypatch):
    model, _ = load_model(str(model_dirs["llm"]))
    exs = _questions(40)
    monkeypatch.setattr(ec, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(ec, "_warned", False)
    st = ec.CheckStats()
    with pytest.warns(UserWarning, match="without bf16 hardware"):
        got = choice_loglikelihoods(model, tok, exs, batch_size=8, precision="bf16-checked", stats=st)
    assert got == choice_loglikelihoods(model, tok, exs, batch_size=8) and not st.checked
    with pytest.raises(ValueError, match="'model' or 'bf16-checked'"):
        choice_loglikelihoods(model, tok, exs, precision="bf16")
    # an Apple GPU (mps) is not a CPU: the warning names the device it ran on
    monkeypatch.setattr(ec, "input_device", lambda m: torch.device("mps"))
    monkeypatch.setattr(ec, "_warned", False)
    with pytest.warns(UserWarning, match="on a mps device .checked scoring runs on CUDA or a CPU with bf16"):
        ec.checked_choice_loglikelihoods(model, tok, exs, lambda *a: [[0.0]] * len(exs))


def test_config_validates_precision():
    assert EvalConfig(precision="bf16-checked").precision == "bf16-checked"
    with pytest.raises(ConfigError, match="allowed values: 'model', 'bf16-checked'"):
        EvalConfig(precision="bf16")


def test_cli_eval_precision(model_dirs, data_dir, monkeypatch):
    """``fedkt eval --precision``: scores as the model's precision does (here through the checked path,
    as on a CPU with bf16 hardware); a bad value names the allowed ones; not with --harness."""
    from typer.testing import CliRunner

    from fedkt.cli import app

    monkeypatch.setattr(ec, "worth_checking", lambda m: True)
    args = ["eval", "--model", str(model_dirs["llm"]), "--tasks", "arc_easy", "--data-dir", str(data_dir)]
    ref = CliRunner().invoke(app, args)
    got = CliRunner().invoke(app, args + ["--precision", "bf16-checked"])
    assert ref.exit_code == got.exit_code == 0, got.output
    assert "arc_easy: acc=" in ref.output and ref.output.splitlines()[-1] == got.output.splitlines()[-1]
    bad = CliRunner().invoke(app, args + ["--precision", "bf16"])
    assert isinstance(bad.exception, ConfigError)  # main() prints it as "error: ..." and exits with 2
    assert "--precision = 'bf16' is not allowed; allowed values: 'model', 'bf16-checked'" in str(bad.exception)
    harness = CliRunner().invoke(app, ["eval", "--harness", "arc_easy", "--precision", "bf16-checked"])
    assert harness.exit_code != 0 and "--precision" in harness.output
