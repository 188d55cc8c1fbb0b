"""FedCoLLM's validation split of Dᵃ and per-round adapter selection (``fedcollm_select``): split sizes, the
score by hand, planted selections, scoring that leaves the trajectory alone, config errors, resume."""

import json

import pytest
import torch

from fedkt.algorithms import fedcollm as fedcollm_mod
from fedkt.algorithms import fedcollm_select
from fedkt.algorithms.fedcollm import FedCoLLMConfig, mutual_distill
from fedkt.algorithms.fedcollm_select import Score, checkpoints, round_slices, score_from_lls, split_validation
from fedkt.config import ConfigError
from fedkt.data.tasks import Example
from fedkt.experiment import run_experiment
from fedkt.models import get_adapter_state, load_adapter_state
from fedkt.registry import load_config

from test_fedcollm import aux_examples
from test_fedcollm_options import pair as options_pair
from test_runs import interrupt_and_resume, tiny_config


def pair(model_dirs, dropout=0.0):
    return options_pair(model_dirs, dropout, train=False)  # as loaded: eval mode


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- split
def test_split_sizes_disjoint_and_seeded():
    aux = aux_examples(16)
    train, val = split_validation(aux, 0.25, seed=0)
    assert (len(train), len(val)) == (12, 4)
    ids = [e.id for e in aux]
    assert sorted([e.id for e in train] + [e.id for e in val], key=int) == ids  # a partition of Dᵃ
    assert [e.id for e in train] == [i for i in ids if i not in {e.id for e in val}]  # Dᵃ's order kept
    assert split_validation(aux, 0.25, seed=0) == (train, val)
    assert any(split_validation(aux, 0.25, seed=s)[1] != val for s in (1, 2, 3))
    assert len(split_validation(aux, 0.5, seed=0)[1]) == 8 and len(split_validation(aux, 0.1, seed=0)[1]) == 2
    assert split_validation(aux, 0.0, seed=0) == (aux, [])


@pytest.mark.parametrize("fraction,held", [(0.01, 0), (0.99, 16)])
def test_split_that_leaves_a_side_empty_is_an_error(fraction, held):
    with pytest.raises(ValueError, match=rf"validation_fraction = {fraction} of the auxiliary set's 16 examples "
                                         rf"holds out {held}.*raise partition.aux_size"):
        split_validation(aux_examples(16), fraction, seed=0)


def test_generation_questions_cannot_be_validated():
    gen = [Example("gsm8k", str(i), f"What is {i} + 1?", target=f"#### {i + 1}", label=str(i + 1)) for i in range(8)]
    with pytest.raises(ValueError, match="task\\(s\\) gsm8k are not multiple choice"):
        split_validation(gen, 0.5, seed=0)


def test_fresh_slices_partition_the_distillation_part():
    aux = aux_examples(14)
    slices = round_slices(aux, 3, seed=0)
    assert [len(s) for s in slices] == [5, 5, 4]
    ids = [[int(e.id) for e in s] for s in slices]
    assert sorted(sum(ids, [])) == list(range(14))                  # disjoint, and together all of Dᵃ
    assert all(s == sorted(s) for s in ids)                          # each in Dᵃ's order
    assert round_slices(aux, 3, seed=0) == slices                    # seeded
    assert any(round_slices(aux, 3, seed=s) != slices for s in (1, 2, 3))
    assert round_slices(aux, 1, seed=0) == [aux]
    with pytest.raises(ValueError, match="14 distillation examples into 15 rounds' slices.*raise partition.aux_size"):
        round_slices(aux, 15, seed=0)


# ------------------------------------------------------------------------------------------- score
def test_score_by_hand():
    q0, q1 = aux_examples(2)  # answers: B of 4 choices, C of 3
    s = score_from_lls([q0, q1], [[-2.0, -1.0, -3.0, -4.0], [-1.0, -2.0, -3.0]])
    # q0 right: log p(B) = -1 - logsumexp(-2, -1, -3, -4) = -0.440190; q1 wrong (argmax A):
    # log p(C) = -3 - logsumexp(-1, -2, -3) = -2.407606
    assert s.acc == 0.5
    assert s.loglik == pytest.approx((-0.440190 - 2.407606) / 2, abs=1e-6)
    assert Score(0.5, -9.0) > Score(0.25, 0.0) and Score(0.5, -1.0) > Score(0.5, -2.0)
    assert not Score(0.5, -1.0) > Score(0.5, -1.0)


def test_checkpoints():
    assert checkpoints(16, 4) == [4, 8, 12, 16]
    assert checkpoints(16, 5) == [5, 10, 15, 16]
    assert checkpoints(16, 0) == [16] == checkpoints(16, 16) == checkpoints(16, 40)


# ---------------------------------------------------------------------------------------- selection
def planted(monkeypatch, g, f):
    """validation_score returns the planted accuracies, in call order, per model (g: SLM, f: LLM)."""
    seq = {"g": iter(g), "f": iter(f)}

    def fake(model, tok, examples, batch_size, desc="validate"):
        return Score(next(seq[desc.split("validate ")[1][0]]), 0.0)

    monkeypatch.setattr(fedcollm_select, "validation_score", fake)


@pytest.mark.parametrize("update", ["simultaneous", "sequential"])
def test_best_keeps_the_planted_best_step(model_dirs, monkeypatch, update):
    aux, val = aux_examples(16), aux_examples(4)
    kw = dict(kd_lambda=1.0, batch_size=4, lr_slm=3e-2, lr_llm=3e-2, update=update)
    slm0, llm0, tok = pair(model_dirs)
    start_f = get_adapter_state(llm0)
    # reference: the SLM after 2 steps of the same distillation (batch order is a prefix of R = 3's)
    slm2, llm2, _ = pair(model_dirs)
    mutual_distill(slm2, llm2, tok, aux, FedCoLLMConfig(kd_steps=2, **kw), 64, 1.0, seed=3)
    after2 = get_adapter_state(slm2)
    slm3, llm3, _ = pair(model_dirs)
    mutual_distill(slm3, llm3, tok, aux, FedCoLLMConfig(kd_steps=3, **kw), 64, 1.0, seed=3)
    last_g, last_f = get_adapter_state(slm3), get_adapter_state(llm3)

    planted(monkeypatch, g=[0.25, 0.5, 0.75, 0.5], f=[0.5, 0.5, 0.25, 0.5])
    cfg = FedCoLLMConfig(kd_steps=3, validation_fraction=0.25, select="best", select_every=1, **kw)
    stats = mutual_distill(slm0, llm0, tok, aux, cfg, 64, 1.0, seed=3, val=val)
    assert stats["val_steps_g"] == [0, 1, 2, 3] and stats["val_acc_g"] == [0.25, 0.5, 0.75, 0.5]
    assert stats["selected_step_g"] == 2 and stats["selected_step_f"] == 0  # ties keep the earlier step
    assert same(get_adapter_state(slm0), after2)  # (sequential: the SLM's phase runs first, so also step 2)
    assert same(get_adapter_state(llm0), start_f)  # the LLM's distillation only made it worse: kept its start
    assert not same(after2, last_g) and not same(start_f, last_f)

    # "last" with the same planted scores: the scores are a record, the adapters those of R = 3
    planted(monkeypatch, g=[0.25, 0.5, 0.75, 0.5], f=[0.5, 0.5, 0.25, 0.5])
    slm_l, llm_l, _ = pair(model_dirs)
    stats = mutual_distill(slm_l, llm_l, tok, aux, FedCoLLMConfig(kd_steps=3, validation_fraction=0.25,
                                                                   select_every=1, **kw), 64, 1.0, seed=3, val=val)
    assert stats["selected_step_g"] == 3 == stats["selected_step_f"]
    assert same(get_adapter_state(slm_l), last_g) and same(get_adapter_state(llm_l), last_f)


def test_real_scoring_leaves_the_trajectory_alone(model_dirs):
    """With LoRA dropout (random draws every step) and real validation scoring every step, "last" ends on
    the same adapters as distillation with no scoring at all; "best" holds a real, recorded score."""
    aux, val = split_validation(aux_examples(16), 0.25, seed=0)
    kw = dict(kd_steps=4, kd_lambda=1.0, batch_size=4, lr_slm=3e-2, lr_llm=3e-2)
    slm, llm, tok = pair(model_dirs, dropout=0.1)
    mutual_distill(slm, llm, tok, aux, FedCoLLMConfig(**kw), 64, 1.0, seed=1)
    slm_v, llm_v, _ = pair(model_dirs, dropout=0.1)
    stats = mutual_distill(slm_v, llm_v, tok, aux, FedCoLLMConfig(validation_fraction=0.25, select_every=1, **kw),
                           64, 1.0, seed=1, val=val)
    assert same(get_adapter_state(slm), get_adapter_state(slm_v))
    assert same(get_adapter_state(llm), get_adapter_state(llm_v))
    assert len(stats["val_acc_g"]) == 5 and all(a in (0, 0.25, 0.5, 0.75, 1) for a in stats["val_acc_g"])
    # the recorded score of the last step is the model's real score
    real = fedcollm_select.validation_score(slm_v, tok, val, 16)
    assert stats["val_acc_g"][-1] == real.acc and stats["val_loglik_g"][-1] == pytest.approx(real.loglik, abs=1e-5)


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw,msg", [
    (dict(select="best"), "select = 'best' picks by validation score: set validation_fraction > 0"),
    (dict(validation_fraction=1.0), r"validation_fraction must be in \[0, 1\), got 1.0"),
    (dict(validation_fraction=-0.1), r"validation_fraction must be in \[0, 1\), got -0.1"),
    (dict(select_every=-1), "select_every must be >= 0, got -1"),
    (dict(select="first", validation_fraction=0.2), "select must be one of 'last', 'best', got 'first'"),
])
def test_options_are_validated(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        FedCoLLMConfig(**kw)


def test_option_errors_name_the_key():
    with pytest.raises(ConfigError, match="fedcollm.*select"):
        load_config(None, ['fedcollm.select="best"'])
    assert load_config(None, ['fedcollm.select="best"', "fedcollm.validation_fraction=0.25"]).section(
        FedCoLLMConfig).select == "best"


# ------------------------------------------------------------------------------------------- end to end
def test_selected_run_resumes_bit_identical(tmp_path, model_dirs, data_dir, monkeypatch):
    extra = {"federation.rounds": 3, "partition.aux_size": 12, "fedcollm.validation_fraction": 0.25,
             "fedcollm.select": '"best"', "fedcollm.select_every": 1, "fedcollm.lr_slm": 0.05}
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedcollm"], **extra)
    full = run_experiment(cfg, tmp_path / "full")
    entries = full["methods"]["fedcollm"]["per_round"]
    for e in entries:
        d = e["distill"]
        assert d["val_steps_g"] == [0, 1, 2, 3] and d["selected_step_g"] in d["val_steps_g"]
        best = max(range(4), key=lambda i: (d["val_acc_g"][i], d["val_loglik_g"][i], -i))
        assert d["selected_step_g"] == d["val_steps_g"][best]

    resumed = interrupt_and_resume(cfg, tmp_path / "cut", monkeypatch)
    for role in ("slm", "llm"):
        a = load_adapter_state(tmp_path / "full" / "adapters" / "fedcollm" / role)
        b = load_adapter_state(tmp_path / "cut" / "adapters" / "fedcollm" / role)
        assert same(a, b), role
    assert json.dumps(full["methods"]["fedcollm"]["per_round"]) == json.dumps(resumed["methods"]["fedcollm"]["per_round"])


def test_fresh_schedule_distils_each_round_on_its_own_slice(tmp_path, model_dirs, data_dir, monkeypatch):
    """aux_schedule = "fresh": round t's distillation gets exactly slice t of Dᵃ less its validation part;
    "whole" gives every round all of it."""
    seen: dict[str, list[list[str]]] = {"fresh": [], "whole": []}
    real = fedcollm_mod.mutual_distill
    schedule = ["whole"]

    def spy(slm, llm, tok, aux, cfg, *a, **kw):
        seen[schedule[0]].append([e.id for e in aux])
        return real(slm, llm, tok, aux, cfg, *a, **kw)

    monkeypatch.setattr(fedcollm_mod, "mutual_distill", spy)
    extra = {"federation.rounds": 3, "partition.aux_size": 12, "fedcollm.validation_fraction": 0.25,
             "fedcollm.select": '"best"', "fedcollm.kd_steps": 1, "eval.every_round": "false"}
    for sched in ("whole", "fresh"):
        schedule[0] = sched
        cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, ["fedcollm"], **extra,
                             **{"fedcollm.aux_schedule": f'"{sched}"'})
        run_experiment(cfg, tmp_path / sched)
    whole, fresh = seen["whole"], seen["fresh"]
    assert len(whole) == len(fresh) == 3 and len(whole[0]) == 9           # 12 less 3 for validation
    assert whole[0] == whole[1] == whole[2]
    assert [len(s) for s in fresh] == [3, 3, 3]
    assert sorted(sum(fresh, [])) == sorted(whole[0])                     # the same 9, cut in three
    assert len(set(sum(fresh, []))) == 9


def test_aux_schedule_is_validated():
    with pytest.raises(ConfigError, match="aux_schedule"):
        load_config(None, ['fedcollm.aux_schedule="latest"'])
