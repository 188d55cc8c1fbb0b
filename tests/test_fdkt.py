"""FDKT: k-means by hand, embeddings, the filter's and augmentation's defences against bad LLM output, the
protocol end to end through the registry (ε = the accountant's, canaries never leave, resume), FedCoLLM's hook."""

import json
import math
import random

import pytest
import torch

from fedkt.algorithms import fdkt
from fedkt.clustering import kmeans, mean_pooled_embeddings
from fedkt.config import ConfigError
from fedkt.registry import load_config
from fedkt.data.synthetic import ParseStats, fill_mc_template, make_mc, parse_mc, read_indices, render_mc
from fedkt.algorithms.fdkt.filter_augment import augment, filter_clusters, validate_generated
from fedkt.models import load_model
from fedkt.experiment import run_experiment

from test_fedcot import CANARY, canaries_held_by_clients, plant_canary, recorded, scan  # noqa: F401
from test_runs import tiny_config


# ---------------------------------------------------------------------------------------------- k-means
def test_kmeans_two_blobs_by_hand():
    x = torch.tensor([[0, 0], [10, 10], [0, 1], [10, 11], [1, 0], [11, 10]], dtype=torch.float64)
    for seed in range(5):
        km = kmeans(x, 2, seed=seed)
        assert sorted(km.clusters()) == [[0, 2, 4], [1, 3, 5]]
        centers = sorted(km.centers.tolist())
        assert centers[0] == pytest.approx([1 / 3, 1 / 3], abs=1e-12)
        assert centers[1] == pytest.approx([31 / 3, 31 / 3], abs=1e-12)
        # each blob: |(0,0)-c|² + |(0,1)-c|² + |(1,0)-c|² = 2/9 + 5/9 + 5/9 = 4/3
        assert km.inertia == pytest.approx(8 / 3, abs=1e-12)


def test_kmeans_edge_cases_and_seeding():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 6.0]], dtype=torch.float64)
    one = kmeans(x, 1, seed=0)
    assert one.assign.tolist() == [0, 0, 0] and one.centers.tolist() == [[2.0, 2.0]]
    many = kmeans(x, 10, seed=0)  # k > n: one point per cluster
    assert sorted(many.clusters()) == [[0], [1], [2]] and many.inertia == 0.0
    same = torch.tensor([[1.0, 1.0]] * 4)
    assert sorted(kmeans(same, 3, seed=1).clusters()) == [[0, 1, 2, 3]]  # duplicates: one non-empty cluster
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(60, 5, generator=g)
    a, b = kmeans(pts, 6, seed=7), kmeans(pts, 6, seed=7)
    assert torch.equal(a.assign, b.assign) and torch.equal(a.centers, b.centers)
    # a Lloyd fixed point: every point sits with its nearest centre, every centre is its members' mean
    assert torch.equal(torch.cdist(pts, a.centers).argmin(1), a.assign)
    for c, members in enumerate([[i for i in range(60) if a.assign[i] == c] for c in range(6)]):
        if members:
            assert torch.allclose(a.centers[c], pts[members].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="at least one point"):
        kmeans(torch.empty(0, 3), 2, seed=0)


def test_mean_pooled_embeddings_equal_one_at_a_time(model_dirs):
    model, tok = load_model(str(model_dirs["llm"]))
    texts = ["Question: Which planet is closest to the Sun?", "water", "oxygen nitrogen helium hydrogen rock sand"]
    batched = mean_pooled_embeddings(model, tok, texts, batch_size=3, normalize=False)
    with torch.no_grad():
        for i, t in enumerate(texts):
            ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
            assert torch.allclose(batched[i], h, atol=1e-5)
    unit = mean_pooled_embeddings(model, tok, texts, batch_size=2)
    assert torch.allclose(unit.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(unit, torch.nn.functional.normalize(batched, dim=1), atol=1e-5)


# ---------------------------------------------------------------------------------------------- LLM stand-in
class Scripted:
    """A TextGenerator whose answers come from ``answer(prompt, i)``; records the prompts it saw."""

    name = "scripted"

    def __init__(self, answer):
        self.answer, self.prompts, self.calls = answer, [], []

    def chat_prompt(self, system, user, few_shot=()):
        return f"<sys>{system}</sys><user>{user}</user><assistant>"

    def generate(self, prompts, max_new_tokens=128, stop=(), temperature=0.0, seed=0):
        self.calls.append({"n": len(prompts), "temperature": temperature, "seed": seed})
        out = []
        for p in prompts:
            self.prompts.append(p)
            out.append(self.answer(p, len(self.prompts) - 1))
        return out


def mc(q, choices=("oxygen", "carbon dioxide", "helium", "water"), answer=1, task="arc_easy", id=""):
    return make_mc(q, choices, answer, task=task, id=id)


POOL = [mc(f"Which gas number {i} do plants use?") for i in range(10)]


def test_filter_reads_answers_and_keeps_nothing_on_malformed():
    answers = iter(["1, 3", "None", "Samples 2 and 9 are eligible", "All of them", "banana 2"])
    gen = Scripted(lambda p, i: next(answers))
    clusters = [[0, 1, 2], [3], [4, 5, 6, 7, 8, 9]]  # the last is split into chunks of 4 and 2
    kept, st = filter_clusters(gen, POOL, clusters, batch=4)
    # prompt 1: samples 0,1,2 -> "1, 3" keeps 0 and 2; prompt 2: none; prompt 3: chunk [4,5,6,7] and "2 and 9":
    # 9 is out of range -> malformed, nothing kept; prompt 4: chunk [8, 9], "All" -> both; prompt 5: unused
    assert kept == [0, 2, 8, 9]
    assert (st.prompts, st.clusters, st.malformed, st.answered_none, st.kept) == (4, 3, 1, 1, 4)
    assert st.malformed_samples == ["Samples 2 and 9 are eligible"]
    assert gen.calls == [{"n": 4, "temperature": 0.0, "seed": 0}]
    assert "Sample 3:\n" + render_mc(POOL[2]) in gen.prompts[0] and "Sample 4:" not in gen.prompts[0]


ADVERSARIAL = ["", " ", "1.5", "1,000", "0", "-1", "11", "None, 1", "all but 2", "1 2 3 4 5 6 7 8 9 10 11",
               "[1, 2] but not 3", "2-1", "1-99", "\x00", "１", "1e3", "99999999999999999999", "Sample: three",
               "eligible: 1, 3\nreason: because", "I think 2", "**2**", "(1)", "1;2;3", "none\n1"]


def test_scored_filter_keeps_each_clusters_best_margins(model_dirs):
    """filter = "score": margin = log p(Yes) − log p(No) of each sample's eligibility prompt (checked against
    the scorer called directly), each cluster keeps its ⌈keep × size⌉ best."""
    from fedkt.text_generators import HFGenerator
    from fedkt.evaluate import loglikelihoods
    from fedkt.algorithms.fdkt.filter_augment import filter_scored, score_prompt

    model, tok = load_model(str(model_dirs["llm"]))
    gen = HFGenerator(model, tok)
    pool = POOL[:7]
    clusters = [[0, 3, 5], [1, 2], [4, 6]]
    kept, st = filter_scored(gen, model, tok, pool, clusters, keep=0.5, batch_size=4)
    lls = [loglikelihoods(model, tok, [(score_prompt(gen, e), " Yes"), (score_prompt(gen, e), " No")]) for e in pool]
    margin = [y - n for y, n in lls]
    expect = sorted(sorted(c, key=lambda i: -margin[i])[:k] for c, k in zip(clusters, (2, 1, 1)))
    assert kept == sorted(i for c in expect for i in c) and st.kept == 4 and st.prompts == 7
    assert st.margins["mean"] == pytest.approx(sum(margin) / 7, abs=1e-4)
    assert "Answer: B" in score_prompt(gen, pool[0]) and score_prompt(gen, pool[0]).endswith("Reply Yes or No.\nAssistant:")
    assert filter_scored(gen, model, tok, [], [], keep=1.0)[0] == []
    with pytest.raises(ValueError, match="keep must be in"):
        filter_scored(gen, model, tok, pool, clusters, keep=0)


def test_scored_filter_computes_the_shared_prompt_prefix_once(model_dirs, monkeypatch):
    """The scoring prompts share their system turn and instruction: when both answers are one token,
    ``yes_no_margins`` runs that prefix once and prefills each prompt's rest after it; the margins equal
    ``loglikelihoods``' (which it then does not call) in any batch size. Multi-token answers (" Yes" in the
    tiny tokenizer) and prompts without a shared prefix go through ``loglikelihoods``."""
    import os

    import fedkt.algorithms.fdkt.filter_augment as fa
    from fedkt.algorithms.fdkt.filter_augment import score_prompt, yes_no_margins
    from fedkt.data.collate import encode_pairs
    from fedkt.evaluate import loglikelihoods
    from fedkt.text_generators import HFGenerator

    model, tok = load_model(str(model_dirs["llm"]))
    gen = HFGenerator(model, tok)
    prompts = [score_prompt(gen, e) for e in POOL]
    single = ("so", "to")  # one token each after a space in the tiny tokenizer
    pairs = encode_pairs(tok, [(p, " " + c) for p in prompts for c in single])
    assert len(os.path.commonprefix([c for c, _ in pairs])) >= 8 and all(len(k) == 1 for _, k in pairs)

    def direct(ps, answers):
        lls = loglikelihoods(model, tok, [(p, " " + c) for p in ps for c in answers])
        return [lls[2 * i] - lls[2 * i + 1] for i in range(len(ps))]

    want = direct(prompts, single)
    assert len({round(m, 4) for m in want}) > 5  # distinct margins (1e-3 apart: tolerance 1e-4 below)
    called = []
    monkeypatch.setattr(fa, "loglikelihoods", lambda *a, **k: called.append(1) or loglikelihoods(*a, **k))
    for bs in (1, 3, 16):
        assert yes_no_margins(model, tok, prompts, bs, answers=single) == pytest.approx(want, abs=1e-4)
    assert not called  # the prefix path
    # a prompt ending in a newline: it leads both continuations ("\nY", "\nN": 2 tokens each) and cancels
    nl = [p.removesuffix("\nAssistant:") + "\n" for p in prompts]
    assert all(len(k) == 2 for _, k in encode_pairs(tok, [(p, c) for p in nl for c in ("Y", "N")]))
    lls = loglikelihoods(model, tok, [(p, c) for p in nl for c in ("Y", "N")])
    assert yes_no_margins(model, tok, nl, 4, answers=("Y", "N")) == pytest.approx(
        [lls[2 * i] - lls[2 * i + 1] for i in range(len(nl))], abs=1e-4)
    assert not called
    assert yes_no_margins(model, tok, prompts[:3], 2) == pytest.approx(direct(prompts[:3], ("Yes", "No")), abs=1e-5)
    assert len(called) == 1  # " Yes" and " No" differ in 2 of their 3 tokens here: loglikelihoods
    alone = ["Is water wet? Reply\nAssistant:", "Plants need light.\nAssistant:"]
    assert yes_no_margins(model, tok, alone, 4, answers=single) == pytest.approx(direct(alone, single), abs=1e-5)
    assert len(called) == 2  # no shared prefix: loglikelihoods


@pytest.mark.parametrize("seed", range(3))
def test_filter_fuzz_no_exception_and_nothing_unreadable_passes(seed):
    rng = random.Random(seed)
    vocab = ["1", "2", "3", "4", "12", ",", " and ", "None", "all", "samples", "maybe", "-", "[", "]", "\n", ".", "x"]
    outs = [rng.choice(ADVERSARIAL) if rng.random() < 0.3 else
            "".join(rng.choice(vocab) for _ in range(rng.randint(0, 8))) for _ in range(40)]
    if seed == 0:
        outs[:len(ADVERSARIAL)] = ADVERSARIAL
    gen = Scripted(lambda p, i: outs[i])
    pool = [mc(f"Question about thing {i}?") for i in range(160)]
    clusters = [list(range(4 * j, 4 * j + 4)) for j in range(40)]
    kept, st = filter_clusters(gen, pool, clusters, batch=4)
    expect, malformed = [], 0
    for j, out in enumerate(outs):
        sel = read_indices(out, 4)
        if sel is None:
            malformed += 1
        else:
            assert all(0 <= s < 4 for s in sel)
            expect += [4 * j + s for s in sorted(sel)]
    assert kept == sorted(expect) and st.malformed == malformed and st.kept == len(kept)
    if seed == 0:  # the hand-picked adversarial answers: only the clean ones are read
        got = {a: read_indices(a, 4) for a in ADVERSARIAL}
        assert got["1;2;3"] == {0, 1, 2} and got["eligible: 1, 3\nreason: because"] == {0, 2}
        assert got["**2**"] == {1} and got["(1)"] == {0}
        for bad in ("1.5", "1,000", "0", "11", "None, 1", "all but 2", "2-1", "1-99", "I think 2", "", "1e3",
                    "99999999999999999999", "[1, 2] but not 3"):
            assert got[bad] is None, bad


# ---------------------------------------------------------------------------------------------- augment
def test_validate_generated_rejects_invalid_copies_and_duplicates():
    shots = [mc("Which gas do plants take in?"), mc("What do roots absorb?", ("water", "light", "air"), 0)]
    seen = {"an already kept question?"}
    st = ParseStats()
    cases = {
        " What do leaves release?\nA. oxygen\nB. rock\nC. sand\nAnswer: A": "ok",
        " which gas  do plants TAKE in?\nA. a\nB. b\nC. c\nAnswer: A": "copy_of_shot",
        " An already kept question?\nA. a\nB. b\nC. c\nAnswer: B": "duplicate",
        " What do leaves release?\nA. x\nB. y\nC. z\nAnswer: C": "duplicate",  # same as the first valid one
        " Which is a metal?\nA. iron\nB. wood\nC. glass\nD. paper\nAnswer: E": "answer_not_a_choice",
        " Which is hot?\nA. fire\nB. Fire\nC. ice\nAnswer: A": "duplicate_choices",
        " Which is cold?\nA. ice\nB. fire\nAnswer: A": "too_few_choices",
        " Which is wet?\nA. water\nB. sand\nC. dust": "no_answer",
        "Question: Which melts?\nA. ice\nB. rock\nC. iron\nAnswer: A": "ok",  # repeated header is fine
        " Which? Answer: A\nA. x\nB. y\nC. z\nAnswer: A": "marker_in_question",
    }
    got = {t: validate_generated(t, "arc_easy", shots, seen, st) for t in cases}
    for t, want in cases.items():
        assert (got[t] is not None) == (want == "ok"), t
    assert st.accepted == 2 and st.rejected == {
        "copy_of_shot": 1, "duplicate": 2, "answer_not_a_choice": 1, "duplicate_choices": 1, "too_few_choices": 1,
        "no_answer": 1, "marker_in_question": 1}
    assert got["Question: Which melts?\nA. ice\nB. rock\nC. iron\nAnswer: A"].target == "ice"
    assert validate_generated(None, "arc_easy", shots, seen, st) is None and st.rejected["not_text"] == 1


def test_augment_prompts_shots_and_validation():
    kept = [mc("Which gas do plants take in?"), mc("What do roots absorb?"), mc("What gives us light?", task="openbookqa")]

    def answer(p, i):
        if i == 0:
            return " Which gas do plants take in?\nA. a\nB. b\nC. c\nAnswer: A"  # copies a shot? (if shown)
        if i == 3:
            return " garbage"
        return f" New question {i}?\nA. a\nB. b\nC. c\nAnswer: B"

    gen = Scripted(answer)
    valid, st = augment(gen, kept, ["arc_easy", "openbookqa", "arc_challenge"], per_kept=2.0, shots=2, seed=5,
                        temperature=0.7)
    # arc_easy: ceil(2 * 2) = 4 prompts, openbookqa: 2, arc_challenge: no shots
    assert st.prompts == 6 and st.tasks_without_shots == ["arc_challenge"]
    assert all(p.endswith("<assistant>Question:") for p in gen.prompts)
    assert all(render_mc(kept[0]) in p and render_mc(kept[1]) in p for p in gen.prompts[:4])  # both shots shown
    assert render_mc(kept[2]) in gen.prompts[4] and "elementary science" in gen.prompts[4]
    assert gen.calls[0]["temperature"] == 0.7
    assert [e.question for e in valid] == [f"New question {i}?" for i in (1, 2, 4, 5)]
    assert [e.task for e in valid] == ["arc_easy", "arc_easy", "openbookqa", "openbookqa"]
    assert st.validation.rejected == {"copy_of_shot": 1, "no_choices": 1}
    again, _ = augment(Scripted(answer), kept, ["arc_easy", "openbookqa"], 2.0, 2, seed=5)
    assert again == valid  # seeded shot choice


def test_config_validation():
    with pytest.raises(ConfigError, match=r"fdkt.filter = 'x' is not allowed"):
        load_config(None, ['fdkt.filter="x"'])
    with pytest.raises(ConfigError, match=r"fdkt.epsilon must be > 0"):
        load_config(None, ["fdkt.epsilon=0"])
    with pytest.raises(ConfigError, match=r"method 'fdkt' needs a server LLM"):
        load_config(None, ['methods=["fdkt"]'])
    assert math.isinf(load_config(None, ["fdkt.epsilon=inf"]).section(fdkt.FDKTConfig).epsilon)


def test_dp_training_text_and_sampling_plan():
    ex = mc("Which gas do plants take in?")
    prompt, target = fdkt.generation_text(ex)
    assert prompt == ("Write a multiple-choice question for a grade-school science test. The correct answer is B.\n"
                      "Question:")
    assert prompt[:-len("Question:")] + "Question:" + target == prompt[:-len("Question:")] + render_mc(ex)
    assert fdkt.sampling_plan(["arc_easy", "openbookqa"], 6) == [
        ("arc_easy", "A"), ("openbookqa", "A"), ("arc_easy", "B"), ("openbookqa", "B"), ("arc_easy", "C"),
        ("openbookqa", "C")]


def test_fill_mc_template_writes_field_by_field():
    """The model writes only field contents: the question line, each choice after its label, the answer
    letter unless given; every call sees the template so far and stops at the end of the line."""
    seen = []

    def complete(prompts, max_new, stop, tag):
        seen.append((tag, max_new, stop, list(prompts)))
        if tag == "question":
            return [" Which gas  do plants\ttake in?", ""]  # runs of whitespace normalised; an empty question
        if tag == "answer":
            return [" (B)"]
        return [f" {tag[-1].lower()}gas " for _ in prompts]

    out = fill_mc_template(complete, ["P1 Question:", "P2 Question:"], answers=[None, "C"], n_choices=3,
                           question_tokens=40, choice_tokens=9)
    assert out == [" Which gas do plants take in?\nA. agas\nB. bgas\nC. cgas\nAnswer: (B)",
                   " \nA. agas\nB. bgas\nC. cgas\nAnswer: C"]
    assert [t for t, *_ in seen] == ["question", "choice-A", "choice-B", "choice-C", "answer"]
    assert seen[0][1:] == (40, ["\n"], ["P1 Question:", "P2 Question:"])
    assert seen[2][1] == 9 and seen[2][3][0] == "P1 Question: Which gas do plants take in?\nA. agas\nB."
    assert seen[4][1:] == (3, ["\n"], ["P1 Question: Which gas do plants take in?\nA. agas\nB. bgas\nC. cgas\nAnswer:"])
    ex = parse_mc("Question:" + out[0], task="arc_easy")
    assert ex.question == "Which gas do plants take in?" and ex.choices == ("agas", "bgas", "cgas") and ex.answer == 1
    stats = ParseStats()
    assert parse_mc("Question:" + out[1], stats=stats) is None and stats.rejected  # empty question: rejected
    assert fill_mc_template(complete, []) == []
    with pytest.raises(ValueError, match="2 answers for 1 prompts"):
        fill_mc_template(complete, ["Question:"], answers=["A", "B"])


def test_filter_mode_resolves_auto_and_refuses_score_for_a_remote_llm_before_any_client_works():
    from types import SimpleNamespace

    cfg = lambda f: fdkt.FDKTConfig(filter=f)  # noqa: E731
    assert fdkt.filter_mode(cfg("auto"), remote=False) == "score"
    assert fdkt.filter_mode(cfg("auto"), remote=True) == "llm"
    assert fdkt.filter_mode(cfg("none"), remote=True) == "none"
    server = SimpleNamespace(cfg=load_config(None, ['model.llm="openai:http://127.0.0.1:1/v1#m"', 'fdkt.filter="score"',
                                                   'data.tasks=["arc_easy"]']), llm_is_remote=True)
    fed = SimpleNamespace(clients=["c0"], call=lambda *a, **k: pytest.fail("a client was asked to synthesize"))
    with pytest.raises(ValueError, match="needs a local LLM"):
        fdkt.synthesize(server, fed)


def test_augment_with_template_sampling():
    """The LLM fills the template: as many choices as the shots show, its own answer letter (greedy)."""
    kept = [mc("Which gas do plants take in?"), mc("What do roots absorb?")]

    def answer(p, i):
        if p.endswith("Answer:"):
            return " D"
        if p.endswith("Question:"):
            return f" Brand new question {i}?"
        return f" {p[-2].lower()} option"

    gen = Scripted(answer)
    valid, st = augment(gen, kept, ["arc_easy"], per_kept=1.0, shots=2, seed=5, temperature=0.7,
                        sampling="template", question_tokens=30, choice_tokens=8)
    assert st.prompts == 2 and len(valid) == 2 and st.validation.accepted == 2
    assert all(e.choices == ("a option", "b option", "c option", "d option") and e.answer == 3 for e in valid)
    assert [c["temperature"] for c in gen.calls] == [0.7, 0.7, 0.7, 0.7, 0.7, 0.0]  # the answer: greedy
    assert len({c["seed"] for c in gen.calls}) == 6
    with pytest.raises(ValueError, match="sampling must be"):
        augment(gen, kept, ["arc_easy"], 1.0, 2, seed=5, sampling="bogus")


# ---------------------------------------------------------------------------------------------- end to end
def fdkt_config(tmp_path, model_dirs, data_dir, methods=("fdkt",), **extra):
    # free sampling: the scripted models below write whole examples (template sampling has its own tests)
    base = {"fdkt.samples_per_client": 6, "fdkt.sample_tokens": 24, "fdkt.dp_batch_size": 8, "fdkt.dp_epochs": 1.0,
            "fdkt.augment_tokens": 24, "federation.rounds": 1, "partition.num_clients": 2,
            "train.max_steps": 2, "fdkt.sampling": '"free"', "fdkt.augment_sampling": '"free"',
            "fdkt.filter": '"llm"', "fdkt.synthetic_set": '"private+synthetic"'}  # the pre-issue-22 training set
    base.update(extra)
    if "fedcollm" not in methods:  # tiny_config adds model.llm for fedcollm itself
        base["llm"] = True
    return tiny_config(tmp_path, model_dirs, data_dir, list(methods), **base)[0]


def test_end_to_end_epsilon_is_the_accountants_and_canaries_never_leave(tmp_path, model_dirs, data_dir, recorded):
    from fedkt.privacy.dp_sgd import effective_delta, epsilon_for

    plant_canary(data_dir)
    cfg = fdkt_config(tmp_path, model_dirs, data_dir, ("standalone", "fdkt"), **{"fdkt.client_epsilons": "[1.0, 8.0]"})
    out = run_experiment(cfg, tmp_path / "r")
    res = out["methods"]["fdkt"]
    rec = res["fdkt"]
    sizes = dict(zip(("client0", "client1"), out["data"]["clients"]))
    for cid, target in (("client0", 1.0), ("client1", 8.0)):
        p = rec["privacy"][cid]
        n = sizes[cid]
        assert p["examples"] == n and p["delta"] == effective_delta(1e-5, n) and p["target_epsilon"] == target
        assert p["steps"] == p["planned_steps"] == math.ceil(n / 8) and p["sample_rate"] == 8 / n
        assert p["epsilon_spent"] == pytest.approx(
            epsilon_for(p["noise_multiplier"], p["sample_rate"], p["steps"], p["delta"]), rel=1e-9)
        assert target - 0.05 <= p["epsilon_spent"] <= target
    assert rec["privacy"]["client0"]["noise_multiplier"] > rec["privacy"]["client1"]["noise_multiplier"]
    # what left the clients: DP samples and public figures only
    synth = [m for method, _, m in recorded if method == "synthesize"]
    assert len(synth) == 2 and all(set(m.meta) == {"tasks", "generated", "parsed", "rejected", "label_agree", "dp",
                                                   "raw_samples", "randomness"} for m in synth)  # no timings
    assert all(set(m.meta["dp"]) == set(fdkt.PUBLIC_DP_FIELDS) for m in synth)
    assert canaries_held_by_clients(cfg, tmp_path) > 10 and scan(recorded) == []
    trained = [m for method, _, m in recorded if method == "train_and_evaluate" and "trained_on" in m.meta]
    assert len(trained) == 2 and all(set(m.meta) == {"metrics", "trained_on", "synthetic", "correct"} and not m.texts
                                     and not m.tensors for m in trained)
    st = rec["stages"]
    assert st["generated"] == 12 and st["per_client"]["client0"]["generated"] == 6
    # a random tiny model writes no valid question: nothing to train on but private data, and FDKT is then
    # exactly Standalone (same seed, same epochs: a paired comparison)
    assert st["parsed"] == 0 and st["final"] == 0
    assert res["per_client"] == out["methods"]["standalone"]["per_client"]
    assert res["slm"] == out["methods"]["standalone"]["slm"] and res["slm"]["arc_easy"]["n"] == 12
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## FDKT: privacy and synthetic data" in report and "| client0 | 1 | " in report


def test_template_sampling_end_to_end(tmp_path, model_dirs, data_dir, recorded, monkeypatch):
    """Template sampling through the registry: the clients' DP model is asked field by field (its outputs
    scripted here: a random tiny model writes invalid UTF-8), each sample carries the answer letter of the
    sampling plan, the seeds differ per client and field, and only the samples leave a client."""
    from fedkt.algorithms.fdkt import template_fill

    plant_canary(data_dir)
    calls = []

    def scripted(model, tok, prompts, answers=None, n_choices=4, question_tokens=64, choice_tokens=24,
                 batch_size=16, temperature=1.0, top_p=1.0, top_k=0, seed_for=None, greedy=(), stats=None):
        who = f"c{len(calls) // 5}"

        def complete(ps, max_new, stop, tag):
            calls.append((tag, seed_for(tag), max_new, tuple(stop)))
            if tag == "question":
                return [f" Which thing {who} {i} is a gas?" for i in range(len(ps))]
            return [f" {tag[-1].lower()}{i}" for i in range(len(ps))]
        return fill_mc_template(complete, prompts, answers, n_choices, question_tokens, choice_tokens)

    monkeypatch.setattr(template_fill, "fill_mc_template_cached", scripted)
    cfg = fdkt_config(tmp_path, model_dirs, data_dir, **{
        "fdkt.sampling": '"template"', "fdkt.question_tokens": 6, "fdkt.choice_tokens": 3,
        "fdkt.filter": '"none"', "fdkt.augment_per_kept": 0})
    res = run_experiment(cfg, tmp_path / "r")["methods"]["fdkt"]
    st = res["fdkt"]["stages"]
    assert (st["generated"], st["parsed"], st["final"]) == (12, 12, 12)
    assert all(pc["label_agree"] == 6 for pc in st["per_client"].values())
    synth = [m for method, _, m in recorded if method == "synthesize"]
    for m in synth:
        exs = [parse_mc(t) for t in m.texts]
        assert ["ABCD"[e.answer] for e in exs] == ["A", "B", "C", "D", "A", "B"]  # sampling_plan's letters
        assert exs[1].choices == ("a1", "b1", "c1", "d1") and exs[1].question.endswith("1 is a gas?")
    assert [c[2:] for c in calls[:5]] == [(6, ("\n",))] + [(3, ("\n",))] * 4
    assert len(calls) == 10 and len({c[1] for c in calls}) == 10, calls  # 2 clients x 5 fields, each its own seed
    assert scan(recorded) == []


def test_canary_scan_sees_a_memorising_model(tmp_path, model_dirs, data_dir, recorded, monkeypatch):
    """Positive control: a DP model that regurgitated private text would be caught by the same scan."""
    plant_canary(data_dir)
    monkeypatch.setattr(fdkt.client, "sample_generations", lambda model, tok, prompts, *a, **k: [
        f" What is {CANARY} {i}?\nA. a\nB. b\nC. c\nAnswer: A" for i in range(len(prompts))])
    cfg = fdkt_config(tmp_path, model_dirs, data_dir, **{"fdkt.epsilon": "inf", "fdkt.filter": '"none"',
                                                         "fdkt.augment_per_kept": 0})
    res = run_experiment(cfg, tmp_path / "r")["methods"]["fdkt"]
    assert res["fdkt"]["stages"]["parsed"] == 12 and res["fdkt"]["stages"]["final"] == 6  # same 6 from both
    assert len(scan([r for r in recorded if r[0] == "synthesize"])) >= 12


GOOD = " Which {w} is a gas?\nA. rock\nB. {w}\nC. iron\nD. wood\nAnswer: B"
WORDS = ["oxygen", "helium", "neon", "argon", "xenon", "radon", "steam", "ozone"]


def scripted_clients(monkeypatch):
    """The clients' DP models write: per client 4 valid questions (one also written by the other client),
    a duplicate, a malformed block."""
    def sample(model, tok, prompts, meta, seed, desc):
        c = int(desc.split()[0].removeprefix("client"))
        ws = WORDS[3 * c: 3 * c + 4]
        return [GOOD.format(w=w) for w in ws] + [GOOD.format(w=ws[0]), " Which? no choices"][:len(prompts) - 4]

    monkeypatch.setattr(fdkt.client, "sample_generations", sample)


def scripted_llm(monkeypatch):
    def answer(p, i):
        if "eligible" in p:
            return "1"  # the first sample of every cluster
        return f" A new question {i}?\nA. one\nB. two\nC. three\nAnswer: C"

    from fedkt.server import ServerContext

    monkeypatch.setattr(ServerContext, "generator", lambda server, batch_size=16: Scripted(answer))  # fresh per call


def test_stages_counted_end_to_end_and_resume_equals_uninterrupted(tmp_path, model_dirs, data_dir, monkeypatch):
    scripted_clients(monkeypatch)
    scripted_llm(monkeypatch)
    cfg = fdkt_config(tmp_path, model_dirs, data_dir, **{"fdkt.epsilon": "inf", "fdkt.cluster_size": 3,
                                                         "fdkt.augment_per_kept": 1.0})
    full = run_experiment(cfg, tmp_path / "full")["methods"]["fdkt"]
    st = full["fdkt"]["stages"]
    assert [st["per_client"][c]["parsed"] for c in ("client0", "client1")] == [4, 4]
    assert st["per_client"]["client0"]["rejected"] == {"duplicate": 1, "no_choices": 1}
    assert (st["generated"], st["parsed"], st["received_valid"]) == (12, 8, 7)  # "argon" from both clients
    assert st["rejected_on_receipt"] == {"duplicate": 1}
    f = st["filter"]
    assert (f["clusters"], f["prompts"], f["malformed"], f["answered_none"]) == (3, 3, 0, 0)  # ceil(7 / 3)
    assert st["kept"] == f["kept"] == 3
    assert st["augment"]["prompts"] == 3 and st["augmented_valid"] == 3 and st["final"] == 6
    assert full["fdkt"]["trained_on"] == {"client0": 28 + 6, "client1": 28 + 6}
    assert len(full["fdkt"]["samples"]["kept"]) == 3 and full["fdkt"]["samples"]["augmented"][0].startswith("Question:")
    assert set(full["timings"]) == {"synthesize_s", "embed_cluster_s", "filter_s", "augment_s", "client_train_eval_s"}

    # interrupted after the synthesis: the resumed run asks no client to synthesize again
    calls = []
    orig = fdkt.FDKT.handlers["train_and_evaluate"]

    def die(ctx, msg):
        raise KeyboardInterrupt()

    monkeypatch.setitem(fdkt.FDKT.handlers, "train_and_evaluate", die)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut")
    monkeypatch.setitem(fdkt.FDKT.handlers, "train_and_evaluate", orig)
    monkeypatch.setitem(fdkt.FDKT.handlers, "synthesize", lambda ctx, msg: calls.append(1))
    resumed = run_experiment(cfg, tmp_path / "cut", resume=True)["methods"]["fdkt"]
    assert calls == []
    same = ("privacy", "stages", "samples", "trained_on")
    assert resumed["per_client"] == full["per_client"] and all(resumed["fdkt"][k] == full["fdkt"][k] for k in same)
    # without the server's saved set, the clients answer from their state: same samples, no new DP training
    (tmp_path / "cut" / "fdkt" / "synthetic.json").unlink()
    (tmp_path / "cut" / "results.json").unlink()
    monkeypatch.setitem(fdkt.FDKT.handlers, "synthesize", fdkt.client_synthesize)
    import fedkt.privacy.dp_sgd as dp_sgd

    monkeypatch.setattr(dp_sgd, "dp_train_loop", lambda *a, **k: pytest.fail("DP-trained twice"))
    again = run_experiment(cfg, tmp_path / "cut", resume=True)["methods"]["fdkt"]
    assert again["per_client"] == full["per_client"] and all(again["fdkt"][k] == full["fdkt"][k] for k in same)


def test_synthesize_over_any_federation_for_fedcollm(tmp_path, model_dirs, data_dir, monkeypatch):
    """The FedCoLLM hook: steps 1–3 over any federation whose clients answer CLIENT_HANDLERS."""
    from fedkt.registry import MethodSpec
    from fedkt.simulation import Simulation

    scripted_clients(monkeypatch)
    scripted_llm(monkeypatch)
    cfg = fdkt_config(tmp_path, model_dirs, data_dir, ("fedcollm",), **{"fdkt.epsilon": "inf", "fdkt.cluster_size": 3,
                                                                          "fdkt.augment_per_kept": 0.0})
    sim = Simulation(cfg, tmp_path / "s")
    server = sim.server()
    spec = MethodSpec(name="probe", label="probe", summary="", run=lambda s: None, handlers=fdkt.CLIENT_HANDLERS)
    cache = tmp_path / "s" / "aux.json"
    with server.federation(spec) as fed:
        aux = fdkt.synthesize(server, fed, cache=cache).examples
        assert fed.ledger.total("up") > 0
    assert len(aux) == 3 and all(e.task == "arc_easy" and e.is_mc for e in aux)
    with server.federation(spec) as fed:  # cached: no client is asked again
        assert fdkt.synthesize(server, fed, cache=cache).examples == aux and fed.ledger.entries == []


def test_fedcollm_with_fdkt_auxiliary_set_end_to_end(tmp_path, model_dirs, data_dir, monkeypatch):
    """fedcollm.aux_source = "fdkt": Dᵃ is the clients' DP synthetic set (3 examples here), not the server's."""
    import fedkt.algorithms.fedcollm as fc

    scripted_clients(monkeypatch)
    scripted_llm(monkeypatch)
    seen = []
    orig = fc.mutual_distill
    monkeypatch.setattr(fc, "mutual_distill", lambda slm, llm, tok, aux, *a, **k: (seen.append(aux), orig(slm, llm, tok, aux, *a, **k))[1])
    cfg = fdkt_config(tmp_path, model_dirs, data_dir, ("fedcollm",), **{
        "fdkt.epsilon": "inf", "fdkt.cluster_size": 3, "fdkt.augment_per_kept": 0.0,
        "fedcollm.aux_source": '"fdkt"', "fedcollm.kd_steps": 1, "federation.rounds": 2})
    res = run_experiment(cfg, tmp_path / "run")["methods"]["fedcollm"]
    assert len(seen) == 2 and all(len(a) == 3 and all(e.is_mc for e in a) for a in seen)
    synthetic = {e.question for e in seen[0]}
    assert synthetic.isdisjoint({e.question for e in fdkt_server_aux(cfg, tmp_path)})
    assert res["per_round"][0]["fdkt"]["stages"]["final"] == 3
    assert (tmp_path / "run" / "fedcollm" / "synthetic_aux.json").is_file()


def fdkt_server_aux(cfg, tmp_path):
    from fedkt.simulation import Simulation

    return Simulation(cfg, tmp_path / "aux-probe").server().aux


from test_text_generators import stub  # noqa: E402,F401 - the stub OpenAI-compatible server fixture


def test_llm_behind_an_openai_compatible_server(tmp_path, model_dirs, data_dir, monkeypatch, stub):
    """Filter prompts go to the server; its answers ("ans(...) END tail") are malformed: nothing is kept,
    every prompt is counted as malformed, and the samples are embedded with the server's SLM copy."""
    scripted_clients(monkeypatch)
    cfg = fdkt_config(tmp_path, model_dirs, data_dir, **{"model.llm": f'"openai:{stub.base}#stub-model"',
                                                         "fdkt.epsilon": "inf", "fdkt.cluster_size": 3})
    res = run_experiment(cfg, tmp_path / "r")["methods"]["fdkt"]
    f = res["fdkt"]["stages"]["filter"]
    sent = [p for r in stub.requests if r["body"] for p in
            (r["body"]["prompt"] if isinstance(r["body"]["prompt"], list) else [r["body"]["prompt"]])]
    assert len(sent) == f["prompts"] == f["malformed"] == 3 and all("eligible" in p for p in sent)
    assert res["fdkt"]["stages"]["kept"] == res["fdkt"]["stages"]["final"] == 0
    assert f["malformed_samples"][0].startswith("ans(") and res["slm"]["arc_easy"]["n"] == 12
