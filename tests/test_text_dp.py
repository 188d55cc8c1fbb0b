"""Token-level text DP: the exponential mechanism's distribution, its DP bound, coverage policy, the kit's
files, determinism, the audit and the canary scanner. Toy embedding spaces and the conftest tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from fedkt.privacy import (
    EmbeddingKit,
    KitMismatchError,
    map_attack,
    perturb,
    perturb_batch,
    render_audit_table,
    sample_replacements,
    scan_for_canaries,
    text_dp_audit,
)
from fedkt.privacy.text_dp_kit import textdp_cache_dir

V_TOY, N_TOY = 40, 8


@pytest.fixture(scope="module")
def toy():
    """40 random points in 3-D, one class, every token covered, exact (float32) neighbour search."""
    emb = torch.randn(V_TOY, 3, generator=torch.Generator().manual_seed(0))
    return emb, EmbeddingKit.build(emb, None, n_neighbors=N_TOY, search_dtype=torch.float32)


@pytest.fixture(scope="module")
def tkit(tok):
    emb = torch.randn(len(tok), 32, generator=torch.Generator().manual_seed(1))  # a model's input embeddings
    return emb, EmbeddingKit.build(emb, tok, n_neighbors=8)


def theoretical(emb: torch.Tensor, t: int, eps: float, n: int = N_TOY, utility: str = "rank") -> torch.Tensor:
    """P(. | t) straight from the definition on the dense distance matrix (independent of the kit)."""
    d = torch.cdist(emb.double(), emb.double())[t]
    if utility == "rank":
        rank = torch.empty(len(d), dtype=torch.float64)
        rank[torch.argsort(d)] = torch.arange(len(d), dtype=torch.float64)
        u = torch.where(rank < n, -rank / n, -1.0)
    else:
        r = torch.sort(d).values[n]  # distance to the (N+1)-th nearest, t itself being the 1st
        return torch.softmax(eps * -(d / r).clamp(max=1.0) / 2, 0)  # exponent eps u / (2 du), du = 1
    return torch.softmax(eps * u, 0)  # rank: every token has the same multiset of utilities, so eps u / du


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; bins with expected < 5 are pooled. p = Q(df/2, chi2/2)."""
    n = counts.sum().double()
    exp = probs.double() * n
    small = exp < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    chi2 = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2))


def test_kit_matches_definition_and_is_o_vn(toy):
    emb, kit = toy
    assert kit.neighbors.shape == (V_TOY, N_TOY) and kit.neighbors.dtype == torch.int32
    assert kit.utility.shape == (V_TOY, N_TOY) and kit.utility.dtype == torch.float32
    assert kit.nbytes == V_TOY * N_TOY * (4 + 4) + V_TOY * (4 + 1 + 1)
    assert torch.equal(kit.neighbors[:, 0], torch.arange(V_TOY, dtype=torch.int32))  # itself first
    assert torch.all(kit.utility[:, 0] == 0) and kit.utility.min() >= -1 and kit.utility.max() <= 0
    for t in (0, 7, 39):
        assert torch.allclose(kit.transition_probs(t, 4.0), theoretical(emb, t, 4.0), atol=1e-6)
    dist = EmbeddingKit.build(emb, None, n_neighbors=N_TOY, utility="distance", search_dtype=torch.float32)
    assert torch.equal(dist.neighbors, kit.neighbors) and dist.meta["utility"] == "distance"
    for t in (0, 7, 39):
        assert torch.allclose(dist.transition_probs(t, 4.0), theoretical(emb, t, 4.0, utility="distance"), atol=1e-6)
    assert not torch.allclose(theoretical(emb, 7, 4.0), theoretical(emb, 7, 4.0, utility="distance"), atol=1e-3)


def test_exponential_mechanism_frequencies_chi2(toy):
    emb, kit = toy
    t, eps = 5, 4.0
    out = sample_replacements(torch.full((20000,), t), kit, eps, seed=123)
    counts = torch.bincount(out, minlength=V_TOY)
    assert chi2_pvalue(counts, theoretical(emb, t, eps)) > 0.01
    assert chi2_pvalue(counts, theoretical(emb, t, 6.0)) < 1e-6  # the wrong epsilon is rejected


def test_pure_dp_bound_between_any_two_tokens(toy, tok, tkit):
    emb, kit = toy
    dist = EmbeddingKit.build(emb, None, n_neighbors=N_TOY, utility="distance", search_dtype=torch.float32)
    _, tk = tkit  # real tokenizer classes: covered and uncovered (uniform) inputs mixed, per class
    uncovered = torch.nonzero(~tk.covered).flatten()[:20].tolist()
    for eps in (0.5, 3.0, 10.0):
        for k, tokens, low in ((kit, range(V_TOY), 0.9), (dist, range(V_TOY), 0.3),
                               (tk, list(range(0, 300, 7)) + uncovered, 0.9)):
            logp = torch.stack([k.transition_probs(t, eps) for t in tokens]).log()
            same = (tk.token_class[list(tokens)][:, None] == tk.token_class[list(tokens)][None]) if k is tk else True
            diff = (logp[:, None, :] - logp[None, :, :]).nan_to_num(nan=-math.inf)  # -inf - -inf: other class
            worst = diff.masked_fill(~torch.as_tensor(same)[..., None], -math.inf).max()
            assert low * eps < worst <= eps + 1e-9  # the bound holds (and is tight for the rank utility)


def test_eps_inf_is_the_identity(tok, tkit):
    _, kit = tkit
    text = "Question: Which planet is closest to the Sun?\nAnswer: Mercury, 42 degrees (and héllo)"
    r = perturb(text, kit, tok, math.inf, seed=0)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert r.text == text and r.token_ids == ids and r.n_changed == 0 and r.n_tokens == len(ids)
    assert tok.decode(r.token_ids, clean_up_tokenization_spaces=False) == text
    assert r.epsilon_total == math.inf and r.epsilon_per_token == math.inf


def test_accounting_and_every_token_can_change(tok, tkit):
    _, kit = tkit
    texts = ["The answer is 42.", "Natalia sold clips to 48 of her friends in April."]
    res = perturb_batch(texts, kit, tok, 2.0, seed=3)
    for text, r in zip(texts, res):
        orig = tok(text, add_special_tokens=False)["input_ids"]
        assert r.n_tokens == len(orig) == len(r.token_ids)
        assert r.n_changed == sum(a != b for a, b in zip(orig, r.token_ids)) > 0
        assert r.epsilon_total == pytest.approx(2.0 * len(orig))
        assert r.text == tok.decode(r.token_ids, clean_up_tokenization_spaces=False)
    digits = tok("42 48", add_special_tokens=False)["input_ids"]  # numbers are perturbed like any token
    assert all(kit.covered[d] and kit.transition_probs(d, 10.0)[d] < 1 for d in digits)


def test_uncovered_tokens_are_never_passed_through(tok, tkit):
    _, kit = tkit
    special = [tok.bos_token_id, tok.eos_token_id, tok.unk_token_id]
    byte_piece = tok("é", add_special_tokens=False)["input_ids"]  # two lone UTF-8 byte pieces
    assert not kit.covered[special].any() and not kit.covered[byte_piece].any()
    ids = torch.tensor(special + byte_piece).repeat(2000)
    out = sample_replacements(ids, kit, 1e6, seed=1)  # even at a huge epsilon
    assert not (out == ids).any() and kit.covered[out].all()
    assert torch.equal(kit.token_class[out], kit.token_class[ids])  # same class, drawn uniformly
    r = perturb("<s> café </s>", kit, tok, 1e6, seed=2)
    assert r.n_uncovered == 4 and "\ufffd" not in r.text and "<s>" not in r.text and "</s>" not in r.text
    # at eps = 0 the output is uniform over the covered class: specials and byte pieces never appear
    word = tok(" the", add_special_tokens=False)["input_ids"][0]
    out = sample_replacements(torch.full((20000,), word), kit, 0.0, seed=4)
    members = torch.nonzero(kit.covered & (kit.token_class == kit.token_class[word])).flatten()
    assert set(out.unique().tolist()) == set(members.tolist())
    assert chi2_pvalue(torch.bincount(out, minlength=kit.vocab_size)[members],
                       torch.full((len(members),), 1 / len(members))) > 0.01


def test_seeded_determinism(tok, tkit):
    _, kit = tkit
    text = "Which gas do plants take in for photosynthesis? carbon dioxide and water"
    a, b = perturb(text, kit, tok, 3.0, seed=7), perturb(text, kit, tok, 3.0, seed=7)
    c = perturb(text, kit, tok, 3.0, seed=8)
    assert a == b and a.token_ids != c.token_ids
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert perturb_batch([text, text], kit, tok, 3.0, g1) == perturb_batch([text, text], kit, tok, 3.0, g2)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        perturb(text, kit, tok, -1.0, seed=0)


def test_save_load_round_trip_and_mismatch(tmp_path, tok, tkit):
    emb, kit = tkit
    kit.save(tmp_path / "kit")
    back = EmbeddingKit.load(tmp_path / "kit", tok=tok, embeddings=emb)
    for name in ("neighbors", "utility", "radius", "token_class", "covered"):
        a, b = getattr(kit, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert back.meta == kit.meta
    with pytest.raises(KitMismatchError, match="other embeddings"):
        EmbeddingKit.load(tmp_path / "kit", embeddings=emb + 1e-3)
    with pytest.raises(KitMismatchError, match="another model"):
        EmbeddingKit.load(tmp_path / "kit", embeddings=emb[:, :16])
    with pytest.raises(FileNotFoundError, match="not a text-DP kit"):
        EmbeddingKit.load(tmp_path / "nothing")


def test_for_model_builds_once_in_the_cache(tmp_path, monkeypatch, tok, tkit):
    emb, _ = tkit
    monkeypatch.setenv("FEDKT_CACHE", str(tmp_path))
    assert textdp_cache_dir() == tmp_path / "textdp"
    kit = EmbeddingKit.for_model(tok, emb, n_neighbors=8)
    [cached] = list((tmp_path / "textdp").iterdir())
    assert cached.name.endswith("-n8-word_start-rank") and (cached / "kit.safetensors").is_file()
    monkeypatch.setattr(EmbeddingKit, "build", classmethod(lambda *a, **k: pytest.fail("rebuilt")))
    again = EmbeddingKit.for_model(tok, emb, n_neighbors=8)
    assert torch.equal(again.neighbors, kit.neighbors)


def test_map_attack_is_the_bayes_optimal_guess(toy):
    _, kit = toy
    eps = 3.0
    P = torch.stack([kit.transition_probs(t, eps) for t in range(V_TOY)])  # P[t, t']
    guess = map_attack(kit, torch.arange(V_TOY), eps)
    assert torch.allclose(P[guess, torch.arange(V_TOY)], P.max(dim=0).values, rtol=1e-9)


def test_audit_recovery_falls_with_epsilon(tok, tkit):
    _, kit = tkit
    texts = ["Which planet is closest to the Sun? Mercury", "What force pulls objects toward Earth? gravity",
             "The answer is 42. Natalia sold clips to 48 of her friends in April."] * 4
    rows = text_dp_audit(texts, kit, tok, epsilons=(1, 6, 30, math.inf), seed=0, top_k=4)
    rec = [r["recovery_topk"] for r in rows]
    assert rows[-1]["recovery_nn1"] == rows[-1]["recovery_map"] == rec[-1] == rows[-1]["unchanged"] == 1.0
    assert rec[0] < rec[1] < rec[2] <= 1.0 and rows[0]["recovery_nn1"] < 0.2
    n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert rows[1]["n_tokens"] == n and rows[1]["mean_eps_per_prompt"] == pytest.approx(6 * n / len(texts))
    table = render_audit_table(rows)
    assert table.count("\n") == 6 and "| ∞ | ∞ | 100.0% |" in table


def test_audit_of_framed_prompts_scores_the_private_tokens_only(tok, tkit):
    """FedCoT's prompts are framed: the audit perturbs and charges the question and choice texts (what the
    client perturbs), not the template that is sent verbatim; a plain string stays private as a whole."""
    from fedkt.algorithms.fedcot_prompts import question_segments, render_question
    from fedkt.data.tasks import Example

    _, kit = tkit
    exs = [Example(task="arc_easy", id="q1", question="Which planet is closest to the Sun?", choices=("Mercury", "Venus"), answer=0),
           Example(task="arc_easy", id="q2", question="What force pulls objects toward Earth?", choices=("gravity", "wind", "heat"), answer=0)]
    framed = [question_segments(e.question, e.choices) for e in exs]
    private = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for f in framed for s, p in f if p)
    public = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for f in framed for s, p in f if not p)
    assert public >= 2 * 5  # "Question:", "\nChoices:" and a label per choice
    rows = text_dp_audit(framed, kit, tok, epsilons=(3, math.inf), seed=0, top_k=4)
    assert rows[0]["n_tokens"] == private and rows[0]["mean_eps_per_prompt"] == pytest.approx(3 * private / 2)
    whole = text_dp_audit([render_question(e) for e in exs], kit, tok, epsilons=(3,), seed=0, top_k=4)
    assert whole[0]["n_tokens"] == sum(len(tok(render_question(e), add_special_tokens=False)["input_ids"])
                                       for e in exs) > private
    with pytest.raises(TypeError):
        text_dp_audit("one string", kit, tok, epsilons=(3,), top_k=4)


def test_canary_scanner_finds_the_planted_canary_only():
    payloads = {"client_0": {"prompts": ["what is 2+2?", "my code is zx-4417-QUOKKA, keep it"]},
                "client_1": {"prompts": ["nothing here", 12], "meta": {"n": 3}}}
    hits = scan_for_canaries(payloads, ["ZX-4417-quokka", "Bilbo Baggins"])
    assert len(hits) == 1
    h = hits[0]
    assert (h.location, h.canary, h.start) == ("client_0.prompts[1]", "ZX-4417-quokka", 11)
    assert scan_for_canaries(["ZX-4417-quokka"], ["ZX-4417-QUOKKA"], case_sensitive=True) == []
    assert [x.location for x in scan_for_canaries(["a", "b abab"], ["ab"])] == ["1", "1"]
