"""Attacks that try: the contextual (noisy-channel + LM prior) attack on text DP, canary exposure (formula,
n-gram attacker on received texts, exact channel attacker on perturbed prompts) and the loss-threshold
membership attack on uploaded adapters. Tiny models built in code; every number is computed."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_llama
from fedkt.privacy.attacks_text import (
    ChannelModel,
    aligned_recovery,
    start_ids,
    attack_table,
    contextual_attack,
    make_canaries,
    plant,
    render_attack_table,
)
from fedkt.privacy.audit import map_attack
from fedkt.privacy.exposure import (
    NGramModel,
    exposure,
    exposure_of_scores,
    ngram_exposure,
    random_baseline,
    rank_of,
    secret_candidates,
    text_dp_exposure,
)
from fedkt.privacy.text_dp import EmbeddingKit, sample_replacements

SENTENCE = "Which planet is closest to the Sun? Mercury is closest to the Sun."


@pytest.fixture(scope="module")
def tkit(tok):
    emb = torch.randn(len(tok), 32, generator=torch.Generator().manual_seed(1))
    return EmbeddingKit.build(emb, tok, n_neighbors=8)


@pytest.fixture(scope="module")
def memorizer(tok):
    """A tiny LM trained hard on SENTENCE (a strongly peaked prior for that text)."""
    m = make_llama(tok, layers=2, hidden=32, seed=3, init_range=0.5)
    ids = torch.tensor([start_ids(tok) + tok(SENTENCE, add_special_tokens=False)["input_ids"]])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    m.train()
    for _ in range(60):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    assert loss.item() < 0.05  # it has memorised the sentence
    return m


# ------------------------------------------------------------------------------------------ channel


def test_channel_logprob_is_the_mechanisms_exact_probability(tok, tkit):
    V = tkit.vocab_size
    for eps in (0.7, 4.0):
        ch = ChannelModel(tkit, eps)
        originals = torch.tensor(list(range(0, V, 13)))
        dense = torch.stack([tkit.transition_probs(int(t), eps) for t in originals]).log()  # [n, V]
        for t_obs in (5, 77, 150, 260):
            lp = ch.logprob(torch.tensor(t_obs), originals)
            finite = dense[:, t_obs].isfinite()
            assert torch.allclose(lp[finite], dense[finite, t_obs], atol=1e-9)
            assert torch.all(lp[~finite] == -math.inf)
        # the proposed candidates are the observed token's best explanations among its reverse neighbours
        obs = torch.tensor([5, 77, 150])
        cands = ch.top_candidates(obs, 4)
        for i, t_obs in enumerate(obs.tolist()):
            rev = [t for t in range(V) if t_obs in tkit.neighbors[t].tolist() and tkit.covered[t]]
            best = sorted(rev, key=lambda t: -float(dense_row(tkit, t, eps)[t_obs]))[:4]
            got = ch.logprob(torch.tensor(t_obs), cands[i]).tolist()
            want = [float(dense_row(tkit, t, eps)[t_obs].log()) for t in best]
            assert sorted(got, reverse=True)[: len(want)] == pytest.approx(want, abs=1e-9)
    inf = ChannelModel(tkit, math.inf)
    assert inf.logprob(torch.tensor(7), torch.tensor([7, 8])).tolist() == [0.0, -math.inf]


def dense_row(kit, t, eps):
    return kit.transition_probs(t, eps)


# ------------------------------------------------------------------------------- contextual attack


def test_contextual_attack_recovers_everything_without_noise(tok, tkit):
    m = make_llama(tok, layers=2, seed=5)
    texts = ["Which gas do plants take in for photosynthesis?", "The answer is 42.", SENTENCE]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert contextual_attack(m, tok, tkit, ids, math.inf, beam=3, top_k=4, lm_top=4) == ids


def test_contextual_attack_beats_nearest_embedding_with_a_peaked_prior(tok, tkit, memorizer):
    ids = torch.tensor(tok(SENTENCE, add_special_tokens=False)["input_ids"])
    eps = 3.0
    obs = [sample_replacements(ids, tkit, eps, seed=s) for s in range(6)]
    n = len(ids) * len(obs)
    nn1 = sum(int((o == ids).sum()) for o in obs) / n
    mapr = sum(int((map_attack(tkit, o, eps) == ids).sum()) for o in obs) / n
    guess = contextual_attack(memorizer, tok, tkit, [o.tolist() for o in obs], eps, beam=4, top_k=8, lm_top=8)
    ctx = sum(int((torch.tensor(g) == ids).sum()) for g in guess) / n
    no_prior = contextual_attack(memorizer, tok, tkit, [o.tolist() for o in obs], eps, beam=4, top_k=8, lm_top=8,
                                 lm_weight=0.0)
    ctx0 = sum(int((torch.tensor(g) == ids).sum()) for g in no_prior) / n
    assert nn1 < 0.6 and mapr < 0.6  # at ε = 3 the per-token attacks recover a minority
    assert ctx > 0.9 and ctx > nn1 + 0.3 and ctx > mapr + 0.3  # the prior does the rest
    assert ctx0 < ctx - 0.3  # and it is the prior that does it


def test_contextual_recovery_grows_with_epsilon(tok, tkit):
    m = make_llama(tok, layers=2, seed=5)  # an uninformative prior: the channel decides
    texts = [SENTENCE, "Which gas do plants take in for photosynthesis?", "The answer is 42. Natalia sold clips.",
             "What force pulls objects toward Earth? gravity"]
    can = ["Mercury", "photosynthesis", "Natalia", "gravity"]
    rows = attack_table(texts, can, tkit, tok, m, epsilons=(0.5, 3.0, 8.0, math.inf), seed=1, generator=None)
    rec = [r["token_recovery"]["contextual"] for r in rows]
    assert rec[0] < rec[1] < rec[2] <= rec[3] == 1.0
    assert rec[0] < 0.2 and rec[2] > 0.5
    assert rows[-1]["canary_recovery"] == {"nn1": 1.0, "map": 1.0, "contextual": 1.0}
    assert rows[0]["canary_recovery"]["contextual"] == 0.0
    for r in rows:  # with a flat prior it is the per-token MAP among the proposals: as good as NN@1
        assert r["token_recovery"]["contextual"] >= r["token_recovery"]["nn1"] - 0.05
    table = render_attack_table(rows)
    assert "| ∞ | 100.0% / 100% |" in table and f"{100 * rec[1]:.1f}%" in table


def test_restore_alignment_and_canaries():
    assert aligned_recovery([1, 2, 3, 4, 5], [1, 2, 9, 4, 5, 6]) == 4
    assert aligned_recovery([1, 2, 3], []) == 0
    c = make_canaries(3, 0)
    assert c == make_canaries(3, 0) and len(set(c)) == 3 and all(", record " in x for x in c)
    assert plant(["Q1", "Q2", "Q3"], c)[1] == f"Patient {c[1]} asks: Q2"
    with pytest.raises(ValueError, match="2 canaries for 3 texts"):
        plant(["a", "b", "c"], c[:2])


# ---------------------------------------------------------------------------------------- exposure


def test_exposure_formula_on_hand_computed_ranks():
    assert exposure(1, 1024) == 10.0 and exposure(4, 1024) == 8.0 and exposure(1024, 1024) == 0.0
    assert rank_of(0.5, [0.9, 0.1, 0.5]) == 2.5  # one higher, one tie (half)
    assert exposure_of_scores([0.5, 0.9, 0.1, 0.5], 0) == pytest.approx(2 - math.log2(2.5))
    assert exposure_of_scores([3.0, 1.0, 2.0, 0.0], 0) == 2.0
    assert exposure_of_scores([1.0] * 8, 0) == pytest.approx(3 - math.log2(4.5))  # no information
    # E[exposure] of a uniform rank: N=2 -> (1 + 0)/2; N=4 -> (2 + 1 + (2 - log2 3) + 0)/4
    assert random_baseline(2) == pytest.approx(0.5)
    assert random_baseline(4) == pytest.approx((3 + 2 - math.log2(3)) / 4)
    assert random_baseline(1000) == pytest.approx(sum(math.log2(1000 / r) for r in range(1, 1001)) / 1000) and random_baseline(10**6) < math.log2(math.e)
    g = torch.Generator().manual_seed(0)
    sims = [exposure_of_scores(torch.rand(256, generator=g), 0) for _ in range(400)]
    assert abs(sum(sims) / len(sims) - random_baseline(256)) < 0.2
    with pytest.raises(ValueError, match="rank must be in"):
        exposure(0, 10)


def test_ngram_exposure_memorised_vs_independent(tok):
    template = "The patient's record number is {secret}."
    cands = secret_candidates(200, 0)
    assert len(set(cands)) == 200 and all(len(c) == 4 for c in cands)
    leaked = ["The answer is 42.", template.format(secret=cands[0]), "Mercury is closest to the Sun."]
    assert ngram_exposure(leaked, tok, template, cands) == pytest.approx(math.log2(200))
    indep = ["Natalia sold clips to 48 of her friends in April.", "The boiling point is 100 degrees."]
    exps = [ngram_exposure(indep, tok, template, secret_candidates(200, s)) for s in range(12)]
    assert sum(exps) / len(exps) < 3.0  # random baseline 1.42 at N = 200; max 7.64
    lm = NGramModel([[1, 2, 3], [1, 2, 4]], n=3, vocab_size=10)
    assert lm.score([1, 2, 3]) > lm.score([1, 2, 5]) and lm.prob((1, 2), 3) == pytest.approx(0.7 * 1 / 2 + 0.3 * (
        0.7 * 1 / 2 + 0.3 * 2 / 16))  # trigram 1 2 -> 3: 1/2; bigram 2 -> 3: 1/2; add-one unigram (1 + 1)/(6 + 10)


def test_text_dp_exposure_exact_channel_attacker(tok, tkit):
    template = "Patient record {secret} asks: which gas do plants take in?"
    n = 256
    at_inf = text_dp_exposure(tkit, tok, template, secret_candidates(n, 0), math.inf, seed=0)
    assert at_inf == pytest.approx(math.log2(n))
    low = [text_dp_exposure(tkit, tok, template, secret_candidates(n, s), 0.05, seed=s) for s in range(12)]
    high = [text_dp_exposure(tkit, tok, template, secret_candidates(n, s), 8.0, seed=s) for s in range(12)]
    assert sum(low) / 12 < random_baseline(n) + 1.0
    assert sum(high) / 12 > sum(low) / 12 + 2.0


# -------------------------------------------------------------------------------------- membership


def test_adapter_membership_exposure(tok):
    from fedkt.config import LoraSettings
    from fedkt.models import add_lora
    from fedkt.privacy.membership import MembershipSetting, adapter_exposure_experiment

    m = add_lora(make_llama(tok, layers=2, hidden=32, seed=4, init_range=0.5), LoraSettings(r=8, dropout=0.0))
    st = MembershipSetting(n_candidates=128, steps=40, lr=3e-2, canaries=1, repeats=8, dp_noise_multiplier=2.0,
                           synthetic=16, synthetic_tokens=24)
    r = adapter_exposure_experiment(m, tok, st, seed=0)
    top = math.log2(128)
    assert r["client"] > 0.8 * top  # the plain upload gives the canary away
    assert r["initial"] < 4.0  # the untouched model knows nothing
    assert r["dp_sgd"] < r["client"] - 2.0  # DP-SGD (σ = 2) hides it
    for k in ("synthetic_plain", "synthetic_dp"):  # 40 steps do not make this tiny model *generate* the canary
        assert 0 <= r[k] <= top
    assert 0 <= r["secure_aggregation"] <= top and r["max_exposure"] == top
    assert r["random_baseline"] == pytest.approx(random_baseline(128))


# ---------------------------------------------------------------------------------------------- CLI


def test_fedkt_audit_cli_and_audit_text_dp_alias(tmp_path, model_dirs, data_dir, monkeypatch):
    import json

    from typer.testing import CliRunner

    from fedkt.cli import app

    monkeypatch.setenv("FEDKT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "audit.json"
    r = CliRunner().invoke(app, ["audit", "--model", str(model_dirs["llm"]), "--data-dir", str(data_dir),
                                 "--limit", "3", "--epsilons", "2,inf", "--neighbors", "8", "--beam", "2",
                                 "--top-k", "4", "--lm-top", "4", "--exposure-candidates", "64", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "| ∞ | 100.0% / 100% | 100.0% / 100% | 100.0% / 100% |" in r.output  # restore: whatever it writes
    assert "| ∞ | 6.00 | 6.00 |" in r.output  # exposure at ε = ∞: rank 1 of 64
    res = json.loads(out.read_text())
    assert [row["epsilon"] for row in res["attacks"]] == [2.0, math.inf]
    assert set(res["attacks"][0]["token_recovery"]) == {"nn1", "map", "contextual", "restore"}
    assert res["exposure_text_dp"][0]["exposure_mean"] < res["exposure_text_dp"][1]["exposure_mean"] == 6.0
    r = CliRunner().invoke(app, ["audit-text-dp", "--model", str(model_dirs["llm"]), "--data-dir", str(data_dir),
                                 "--limit", "3", "--epsilons", "2,inf", "--neighbors", "8"])
    assert r.exit_code == 0 and "recovered: MAP" in r.output, r.output


def test_run_hook_setting_and_sample_leaves_rng_and_mode(tok, tkit):
    from fedkt.algorithms.fedcot import FedCoTConfig
    from fedkt.privacy.attacks_text import attack_sample

    assert FedCoTConfig().attack_prompts == 8 and FedCoTConfig(attack_prompts=0).attack_prompts == 0
    with pytest.raises(Exception, match="attack_prompts must be >= 0"):
        FedCoTConfig(attack_prompts=-1)
    m = make_llama(tok, layers=2, seed=6)
    m.train()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    rows = attack_sample(m, tok, tkit, ["Which planet is closest to the Sun?"], [3.0, 10.0], seed=0)
    assert torch.equal(torch.random.get_rng_state(), before) and m.training
    assert [r["epsilon"] for r in rows] == [3.0, 10.0] and set(rows[0]["token_recovery"]) == {"nn1", "map", "contextual"}
    assert rows == attack_sample(m, tok, tkit, ["Which planet is closest to the Sun?"], [3.0, 10.0], seed=0)
    assert attack_sample(m, tok, tkit, [], [3.0]) == []


def test_fedkt_audit_membership_section(tmp_path, model_dirs, data_dir, monkeypatch):
    from typer.testing import CliRunner

    from fedkt.cli import app

    monkeypatch.setenv("FEDKT_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(app, ["audit", "--model", str(model_dirs["slm"]), "--data-dir", str(data_dir),
                                 "--limit", "2", "--epsilons", "inf", "--neighbors", "8", "--no-restore",
                                 "--exposure-candidates", "16", "--membership", "--membership-steps", "2"])
    assert r.exit_code == 0, r.output
    assert "Exposure through uploaded adapters (N = 16; max 4.00" in r.output
    assert "mean of 3 clients' adapters (secure aggregation)" in r.output and "restore" not in r.output
