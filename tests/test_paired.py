"""Paired statistics: McNemar's exact test and the (stratified) paired bootstrap, against hand-computed
values and the normal approximation."""

import math

import pytest

from fedkt.paired import align, compare, mcnemar_p, paired_bootstrap, pool


def test_mcnemar_exact_values():
    # 6 vs 1 discordant: 2 * (C(7,0) + C(7,1)) / 2^7 = 16/128
    assert mcnemar_p(6, 1) == pytest.approx(0.125, abs=1e-15)
    assert mcnemar_p(1, 6) == mcnemar_p(6, 1)
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32, abs=1e-15)
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(10, 10) == 1.0
    # 30 vs 10: the two-sided binomial tail, summed by hand
    tail = sum(math.comb(40, i) for i in range(11)) / 2 ** 40
    assert mcnemar_p(30, 10) == pytest.approx(2 * tail, rel=1e-12)
    assert 0.001 < mcnemar_p(30, 10) < 0.003
    with pytest.raises(ValueError, match="discordant counts must be >= 0"):
        mcnemar_p(-1, 2)


def test_mcnemar_matches_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    for a, b in ((3, 9), (17, 4), (50, 61), (0, 7)):
        assert mcnemar_p(a, b) == pytest.approx(stats.binomtest(a, a + b, 0.5).pvalue, rel=1e-9)


def test_paired_bootstrap_against_the_normal_approximation():
    n, a_only, b_only = 2000, 300, 200
    a = [True] * a_only + [False] * b_only + [True] * 700 + [False] * (n - a_only - b_only - 700)
    b = [False] * a_only + [True] * b_only + [True] * 700 + [False] * (n - a_only - b_only - 700)
    r = paired_bootstrap(a, b, n_boot=4000, seed=1)
    assert (r.diff, r.a_only, r.b_only, r.n) == (0.05, 300, 200, 2000)
    se = math.sqrt((a_only + b_only) / n - r.diff ** 2) / math.sqrt(n)  # sd of d in {-1, 0, 1}
    assert r.ci_low == pytest.approx(r.diff - 1.96 * se, abs=0.1 * 1.96 * se)
    assert r.ci_high == pytest.approx(r.diff + 1.96 * se, abs=0.1 * 1.96 * se)
    assert r.significant() and r.p_mcnemar < 1e-5
    # same seed, same interval; the interval of identical methods is exactly zero
    assert paired_bootstrap(a, b, n_boot=4000, seed=1) == r
    same = paired_bootstrap(a, a)
    assert (same.diff, same.ci_low, same.ci_high, same.p_mcnemar) == (0.0, 0.0, 0.0, 1.0)
    assert not same.significant()


def test_pooling_resamples_within_each_run():
    """Run 1: A right everywhere B is wrong; run 2 the reverse. Pooled: difference 0 and, because each
    run's questions are resampled within the run (each run's sum is constant), an interval of exactly 0."""
    r = pool([([True] * 50, [False] * 50), ([False] * 50, [True] * 50)], n_boot=2000)
    assert (r.diff, r.ci_low, r.ci_high, r.runs, r.n, r.a_only, r.b_only) == (0.0, 0.0, 0.0, 2, 100, 50, 50)
    assert r.p_mcnemar == 1.0
    one = pool([([True, False, True, True], [False, False, True, False])], n_boot=2000)
    assert one.diff == 0.5 and one.a_only == 2 and one.b_only == 0 and one.ci_low <= 0.5 <= one.ci_high


def test_compare_aligns_question_ids_and_refuses_different_questions():
    a = {"q2": True, "q1": False, "q3": True}
    b = {"q1": True, "q3": True, "q2": False}
    assert align(a, b) == ([False, True, True], [True, False, True])
    assert compare(a, b, n_boot=500).diff == 0.0
    with pytest.raises(ValueError, match=r"different questions \(1 only in A, e.g. \['q9'\]; 0 only in B"):
        compare({**a, "q9": True}, b)
    with pytest.raises(ValueError, match="run 0: 2 answers of A but 1 of B"):
        pool([([True, False], [True])])
    with pytest.raises(ValueError, match="no runs"):
        pool([])


def test_fractional_answers_use_mcnemar_for_clustered_pairs():
    """A side scored as the share of clients right (Standalone): the mean of the per-question differences, and
    Durkalski's X² = (Σd)²/Σd² (for 0/1 answers McNemar's (a-b)²/(a+b)), not a sign test: a single model and
    four clients of the same accuracy do not differ, however often the share is below the 0/1."""
    from fedkt.paired import clustered_mcnemar_p

    r = pool([([1, 0, 0, 1], [0.75, 0.25, 0.5, 0.0])], n_boot=500)
    # d = .25, -.25, -.5, 1 -> sum .5, squares .0625 + .0625 + .25 + 1 = 1.375
    assert (r.diff, r.a_only, r.b_only, r.test) == (0.125, 2, 2, "mcnemar_clustered")
    assert r.p_mcnemar == pytest.approx(math.erfc(math.sqrt(0.25 / 1.375 / 2)), rel=1e-12)
    # 0/1 answers: the exact test; Durkalski's X² is McNemar's asymptotic one there
    b = pool([([1, 1, 1, 0], [0, 0, 0, 1])], n_boot=500)
    assert b.test == "mcnemar_exact" and b.p_mcnemar == mcnemar_p(3, 1)
    import numpy as np

    assert clustered_mcnemar_p([np.array([1.0, 1, 1, -1])]) == pytest.approx(math.erfc(math.sqrt(4 / 4 / 2)))
    # same accuracy (30%): the single model right on 3 of 10 questions, the clients' share 0.3 on each
    same = pool([([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0.3] * 10)], n_boot=500)
    assert same.diff == pytest.approx(0.0, abs=1e-12) and same.p_mcnemar == pytest.approx(1.0)
    assert (same.a_only, same.b_only) == (3, 7)  # a sign test would count these
