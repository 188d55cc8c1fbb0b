"""FDKT as the paper runs it (issue 22 §4): the training set of step 4, the LLM re-answering kept samples,
near-duplicates and the filter's quality bar, each task's own number of choices, and the n-gram
contamination check, with hand-made samples and hand-computed values."""

from types import SimpleNamespace

import pytest

from fedkt.algorithms import fdkt
from fedkt.algorithms.fdkt import client as fclient, quality
from fedkt.algorithms.fdkt.filter_augment import augment, filter_scored
from fedkt.algorithms.fdkt.samples import sampling_plan, task_choices
from fedkt.algorithms.fdkt.server import synthetic_part, trains_on_private
from fedkt.data.contamination import NgramIndex, decontaminate, drop_near_duplicates, ngrams, shingles, words
from fedkt.data.synthetic import make_mc, parse_mc, render_mc
from fedkt.experiment import run_experiment
from fedkt.registry import load_config

from test_fdkt import Scripted, fdkt_config, mc, scripted_clients


# ---------------------------------------------------------------------------------------------- 1 training set
def test_synthetic_set_selects_what_a_client_trains_on(monkeypatch):
    kept = [mc("Kept one?"), mc("Kept two?")]
    aug = [mc("Augmented one?")]
    assert load_config(None, []).section(fdkt.FDKTConfig).synthetic_set == "augmented"  # the paper's default
    assert synthetic_part("augmented", kept, aug) == aug and synthetic_part("private+augmented", kept, aug) == aug
    assert synthetic_part("kept+augmented", kept, aug) == kept + aug == synthetic_part("private+synthetic", kept, aug)
    assert [trains_on_private(s) for s in ("augmented", "kept+augmented", "private+augmented", "private+synthetic")] \
        == [False, False, True, True]
    # the client: private data only with train_on = "private+synthetic", then the synthetic set in order
    seen = []
    monkeypatch.setattr(fclient, "train_and_evaluate_locally",
                        lambda ctx, data, epochs, label: (seen.append(data), ({}, {}))[1])  # (metrics, correctness)
    private = [mc("Private question?", id="p0")]
    ctx = SimpleNamespace(data=private)
    msg = lambda on: fdkt.client.Message(texts=[render_mc(e) for e in aug], meta={  # noqa: E731
        "tasks": ["arc_easy"], "epochs": 1.0, "train_on": on})
    r1 = fclient.client_train_and_evaluate(ctx, msg("synthetic"))
    r2 = fclient.client_train_and_evaluate(ctx, msg("private+synthetic"))
    assert [e.question for e in seen[0]] == ["Augmented one?"]
    assert [e.question for e in seen[1]] == ["Private question?", "Augmented one?"]
    assert (r1.meta["trained_on"], r1.meta["synthetic"], r2.meta["trained_on"]) == (1, 1, 2)


def planted_llm(monkeypatch, augmented: list[str]):
    """The server LLM: the list filter keeps sample 1 of each cluster; augmentation writes ``augmented`` in
    turn (then fresh questions)."""
    from fedkt.server import ServerContext

    n = iter(range(10 ** 6))

    def answer(p, i):
        if "eligible" in p:
            return "1"
        return augmented[next(n) % len(augmented)]

    monkeypatch.setattr(ServerContext, "generator", lambda server, batch_size=16: Scripted(answer))


def test_default_trains_on_augmented_only_and_drops_contaminated_and_near_duplicate_items(
        tmp_path, model_dirs, data_dir, monkeypatch):
    """End to end at the defaults (synthetic_set = "augmented"): the clients receive and train on the
    augmented examples only, not their private data, not the kept DP samples; an augmented example that
    copies a test question (planted) is dropped as contaminated, a near-copy of another as a near-duplicate;
    the counts reach results.json and the report."""
    scripted_clients(monkeypatch)
    leak = " Which gas do plants take in for photosynthesis? (1000)\nA. oxygen\nB. carbon dioxide\nC. helium\nD. water\nAnswer: B"
    outs = [leak, " Which layer of the sky above the ground holds the ozone today?\nA. one\nB. two\nC. three\nAnswer: A",
            " Which layer of the sky above the ground holds the ozone now?\nA. one\nB. two\nC. three\nAnswer: A",  # near-dup of the last
            " How many legs does a spider have in total?\nA. six\nB. eight\nC. ten\nAnswer: B"]
    planted_llm(monkeypatch, outs)
    trained, orig = [], fclient.train_and_evaluate_locally
    monkeypatch.setattr(fclient, "train_and_evaluate_locally", lambda ctx, data, *a: (
        trained.append((ctx.cid, tuple(e.question for e in data))), orig(ctx, data, *a))[1])
    cfg = fdkt_config(tmp_path, model_dirs, data_dir, **{
        "fdkt.epsilon": "inf", "fdkt.cluster_size": 3, "fdkt.augment_per_kept": 1.0,
        "fdkt.synthetic_set": '"augmented"', "fdkt.kept_answers": '"keep"'})
    res = run_experiment(cfg, tmp_path / "r")["methods"]["fdkt"]
    st = res["fdkt"]["stages"]
    assert st["kept"] == 3 and st["augment"]["prompts"] == 3 and st["augmented_valid"] == 3  # outs[0..2]
    assert st["contamination"]["augmented"]["dropped"] == 1 and st["contamination"]["dropped"] == 1
    assert st["contamination"]["augmented"]["samples"][0]["eval_id"] == "q1000"
    assert st["contamination"]["eval_questions"] == {"arc_easy": 12} and st["contamination"]["ngram"] == 13
    # 15 words, 13 shingles each, 3 differ: Jaccard 10 / 16 = 0.625 >= 0.6
    assert st["near_duplicates"]["augmented"] == 1 and st["near_duplicates"]["received"] == 0
    assert st["augmented"] == st["final"] == 1 and st["synthetic_set"] == "augmented"
    assert res["fdkt"]["trained_on"] == {"client0": 1, "client1": 1}  # no private data, no kept samples
    assert sorted(trained) == [("client0", ("Which layer of the sky above the ground holds the ozone today?",)),
                               ("client1", ("Which layer of the sky above the ground holds the ozone today?",))]
    report = (tmp_path / "r" / "report.md").read_text()
    assert "contaminated (13-gram overlap with the evaluation sets), dropped | 1 |" in report


# ---------------------------------------------------------------------------------------------- 2 answers
def planted_scorer(monkeypatch):
    """The LLM's choice log-likelihoods: 0 for a choice naming a gas plants take in, -5 otherwise."""
    def lls(model, tok, examples, batch_size=16, desc=""):
        return [[0.0 if c == "carbon dioxide" else -5.0 for c in e.choices] for e in examples]

    monkeypatch.setattr(quality, "choice_loglikelihoods", lls)


def test_kept_answers_relabelled_or_dropped_by_the_llms_pick(monkeypatch):
    planted_scorer(monkeypatch)
    right = mc("Which gas do plants take in?", answer=1)                 # B = carbon dioxide: agrees
    wrong = mc("What do plants absorb from the air?", answer=3, id="w")  # D = water: the LLM picks B
    out, rec = quality.check_answers(None, None, [right, wrong], "relabel")
    assert [e.answer for e in out] == [1, 1] and out[1].target == "carbon dioxide" and out[1].id == "w"
    assert rec == {"mode": "relabel", "checked": 2, "agreed": 1, "relabelled": 1, "dropped": 0}
    out, rec = quality.check_answers(None, None, [right, wrong], "drop")
    assert out == [right] and (rec["agreed"], rec["dropped"], rec["relabelled"]) == (1, 1, 0)
    out, rec = quality.check_answers(None, None, [right, wrong], "keep")
    assert out == [right, wrong] and rec["checked"] == 0
    assert quality.answers_mode("auto", remote=False) == "relabel" and quality.answers_mode("auto", remote=True) == "keep"
    with pytest.raises(ValueError, match="kept_answers = 'drop' .* needs a local LLM"):
        quality.answers_mode("drop", remote=True)
    with pytest.raises(ValueError, match="must be 'relabel', 'drop' or 'keep'"):
        quality.check_answers(None, None, [right], "auto")


def test_kept_answers_are_checked_before_augmentation_end_to_end(tmp_path, model_dirs, data_dir, monkeypatch):
    """Through the server: the scripted clients' samples all say B; a planted scorer picks A for every
    sample: "relabel" turns every kept answer (and so the few-shot examples) into A, "drop" drops them all."""
    scripted_clients(monkeypatch)
    prompts = []

    def answer(p, i):
        prompts.append(p)
        return "1" if "eligible" in p else f" Fresh {i}?\nA. one\nB. two\nC. three\nAnswer: C"

    from fedkt.server import ServerContext

    monkeypatch.setattr(ServerContext, "generator", lambda server, batch_size=16: Scripted(answer))
    monkeypatch.setattr(quality, "choice_loglikelihoods",
                        lambda m, t, exs, batch_size=16, desc="": [[0.0] + [-1.0] * (len(e.choices) - 1) for e in exs])
    base = {"fdkt.epsilon": "inf", "fdkt.cluster_size": 3, "fdkt.augment_per_kept": 1.0}
    res = run_experiment(fdkt_config(tmp_path, model_dirs, data_dir, **base, **{"fdkt.kept_answers": '"relabel"'}),
                         tmp_path / "a")["methods"]["fdkt"]["fdkt"]
    st = res["stages"]
    assert st["answers"] == {"mode": "relabel", "checked": 3, "agreed": 0, "relabelled": 3, "dropped": 0}
    shots = [p for p in prompts if "Here are example questions" in p]
    assert shots and all("Answer: B" not in p.split("<user>")[1] for p in shots)  # every shot relabelled to A
    assert all(s.endswith("Answer: A") for s in res["samples"]["kept"])
    dropped = run_experiment(fdkt_config(tmp_path, model_dirs, data_dir, **base, **{"fdkt.kept_answers": '"drop"'}),
                             tmp_path / "b")["methods"]["fdkt"]["fdkt"]["stages"]
    assert (dropped["filter_kept"], dropped["kept"], dropped["answers"]["dropped"]) == (3, 0, 3)
    assert dropped["augment"]["prompts"] == 0 and dropped["final"] == 0


# ---------------------------------------------------------------------------------------------- 3 filter
def test_near_duplicates_by_shingle_jaccard_by_hand():
    a = mc("Which gas do plants take in", ("oxygen", "carbon", "helium", "water"))
    b = mc("Which gas do plants take in", ("oxygen", "carbon", "helium", "iron"))
    # a: 10 words -> 8 shingles; b shares the first 7 (the last differs): Jaccard 7 / (8 + 8 - 7) = 7/9
    assert words("Which gas, do PLANTS?") == ["which", "gas", "do", "plants"]
    assert len(shingles(" ".join([a.question, *a.choices]))) == 8
    c = mc("Name the planet closest to the Sun", ("Mercury", "Mars", "Venus", "Earth"))
    kept, dropped = drop_near_duplicates([a, b, c], threshold=0.7)
    assert kept == [a, c] and dropped == 1
    assert drop_near_duplicates([a, b, c], threshold=0.78) == ([a, b, c], 0)  # 7/9 = 0.777… < 0.78
    assert drop_near_duplicates([b, c], threshold=0.7, reference=[a]) == ([c], 1)
    assert drop_near_duplicates([a, a], threshold=1.5) == ([a, a], 0)  # above 1: off
    assert shingles("two words") == {("two", "words")}
    with pytest.raises(ValueError, match="near-duplicate threshold must be > 0"):
        drop_near_duplicates([a], threshold=0)


def test_scored_filter_quality_bar_keeps_nothing_of_an_all_garbage_cluster(monkeypatch):
    """Planted margins: cluster [0, 1, 2] is all below the bar (the LLM says No to each), cluster [3, 4] has
    one sample above it; keep = 0.5."""
    import fedkt.algorithms.fdkt.filter_augment as fa

    margins = [-2.0, -0.5, -1.0, 1.5, -0.2]

    def lls(model, tok, requests, batch_size=16, desc=""):
        return [m if k % 2 == 0 else 0.0 for m in margins for k in range(2)]  # log p(Yes) = m, log p(No) = 0

    monkeypatch.setattr(fa, "loglikelihoods", lls)
    gen = Scripted(lambda p, i: "")
    pool = [mc(f"Question {i}?") for i in range(5)]
    kept, st = filter_scored(gen, None, None, pool, [[0, 1, 2], [3, 4]], keep=0.5, min_margin=0.0)
    assert kept == [3] and st.kept == 1 and st.margins["below_bar"] == 4 and st.margins["positive"] == 1
    kept, _ = filter_scored(gen, None, None, pool, [[0, 1, 2], [3, 4]], keep=0.5)  # no bar: the old behaviour
    assert kept == [1, 2, 3]  # ceil(0.5 * 3) = 2 best of the first cluster, ceil(0.5 * 2) = 1 of the second


# ---------------------------------------------------------------------------------------------- 4 choices
CSQA = [make_mc(f"Where would you keep item {i}?", ("box", "shelf", "bag", "car", "desk"), i % 5, task="commonsense_qa",
                id=f"c{i}") for i in range(6)]


def test_each_task_keeps_its_own_number_of_choices(monkeypatch):
    arc = [mc("Q?"), mc("R?", ("a", "b", "c"), 0), mc("S?")]
    assert task_choices(["commonsense_qa", "arc_easy", "openbookqa"], {"commonsense_qa": CSQA, "arc_easy": arc}) == {
        "commonsense_qa": 5, "arc_easy": 4, "openbookqa": 4}  # most common count; 4 without questions
    assert [l for _, l in sampling_plan(["commonsense_qa", "arc_easy"], 12, {"commonsense_qa": 5, "arc_easy": 4})] == [
        "A", "A", "B", "B", "C", "C", "D", "D", "E", "A", "A", "B"]
    # the client's DP model fills 5 choices for a 5-choice task, 4 for a 4-choice one (one call group each)
    from fedkt.algorithms.fdkt import template_fill
    from fedkt.data.synthetic import fill_mc_template

    calls = []

    def scripted(model, tok, prompts, answers=None, n_choices=4, question_tokens=64, choice_tokens=24,
                 batch_size=16, temperature=1.0, top_p=1.0, top_k=0, seed_for=None, greedy=(), stats=None):
        def complete(ps, max_new, stop, tag):
            calls.append((tag, len(ps), seed_for(tag)))
            return [" Where is it?" if tag == "question" else f" {tag[-1].lower()}{i}" for i in range(len(ps))]
        return fill_mc_template(complete, prompts, answers, n_choices, question_tokens, choice_tokens)

    monkeypatch.setattr(template_fill, "fill_mc_template_cached", scripted)
    plan = sampling_plan(["commonsense_qa", "arc_easy"], 4, {"commonsense_qa": 5, "arc_easy": 4})
    meta = {"sampling": "template", "letters": [l for _, l in plan], "n_choices": [5, 4, 5, 4], "gen_batch_size": 4,
            "temperature": 1.0, "top_p": 1.0, "question_tokens": 8, "choice_tokens": 4}
    raw = fclient.sample_generations(None, None, [fdkt.synth_prefix(t, l) for t, l in plan], meta, seed=3, desc="c0")
    exs = [parse_mc("Question:" + r) for r in raw]
    assert [len(e.choices) for e in exs] == [5, 4, 5, 4] and ["ABCDE"[e.answer] for e in exs] == ["A", "A", "B", "B"]
    assert [c[:2] for c in calls] == [("question", 2)] + [(f"choice-{x}", 2) for x in "ABCD"] + \
        [("question", 2)] + [(f"choice-{x}", 2) for x in "ABCDE"]
    assert len({c[2] for c in calls}) == len(calls)  # every field of every group its own seed
    # augmentation writes the task's number of choices, even from 4-choice shots
    gen = Scripted(lambda p, i: " B" if p.endswith("Answer:") else (" New one?" if p.endswith("Question:") else " x" + p[-2]))
    shots = [make_mc(f"Where {i}?", ("a", "b", "c", "d"), 0, task="commonsense_qa") for i in range(2)]
    valid, st = augment(gen, shots, ["commonsense_qa"], per_kept=0.5, shots=2, seed=1, sampling="template",
                        choices={"commonsense_qa": 5})
    assert len(valid) == 1 and valid[0].choices == ("xA", "xB", "xC", "xD", "xE")
    assert "5 choices labelled A to E" in gen.prompts[0]


def test_client_refuses_an_impossible_number_of_choices():
    ctx = SimpleNamespace(state={}, data=[mc("Q?")], cid="client7")
    with pytest.raises(ValueError, match=r"client client7: the request's choices per task \{'arc_easy': 9\}"):
        fclient.client_synthesize(ctx, fdkt.client.Message(meta={"epsilon": 1.0, "tasks": ["arc_easy"], "samples": 1,
                                                                 "choices": {"arc_easy": 9}}))


# ---------------------------------------------------------------------------------------------- 5 contamination
EVAL = {"arc_easy": [make_mc("Which property of a mineral can be determined just by looking at it in the lab",
                             ("luster", "mass", "weight", "hardness"), 0, task="arc_easy", id="Mercury_7")],
        "openbookqa": [make_mc("The sun is responsible for", ("puppies learning new tricks", "plants sprouting"), 1,
                               task="openbookqa", id="obqa-1")]}


def test_ngram_contamination_with_planted_overlaps():
    idx = NgramIndex.build(EVAL, n=13)
    assert ngrams(["a", "b", "c"], 2) == {("a", "b"), ("b", "c")} and ngrams(["a"], 2) == set()
    # a 13-word span of the ARC question (words 2..14), inside a longer synthetic question: contaminated
    copy13 = make_mc("Tell me: property of a mineral can be determined just by looking at it in the, ok?",
                     ("red", "blue", "green"), 0)
    # a 12-word span only (then different words): clean at n = 13, contaminated at n = 12
    copy12 = make_mc("Tell me: property of a mineral can be determined just by looking at IT NOW please",
                     ("red", "blue", "green"), 0)
    short = make_mc("The sun is", ("responsible", "for"), 0)  # 5 words, all inside the OBQA text in order
    short_clean = make_mc("The sun is", ("for", "responsible"), 0)  # same words, other order
    choices_copy = make_mc("Which of these?", ("luster", "mass", "weight", "hardness"), 0)  # 4+2 words: clean
    assert idx.match(" ".join([copy13.question, *copy13.choices])) == ("arc_easy", "Mercury_7")
    clean, rec = decontaminate([copy13, copy12, short, short_clean, choices_copy], idx)
    assert clean == [copy12, short_clean, choices_copy]
    assert rec["checked"] == 5 and rec["dropped"] == 2 and rec["by_eval_task"] == {"arc_easy": 1, "openbookqa": 1}
    assert rec["samples"][1] == {"question": "The sun is", "eval_task": "openbookqa", "eval_id": "obqa-1"}
    clean12, rec12 = decontaminate([copy13, copy12], NgramIndex.build(EVAL, n=12))
    assert clean12 == [] and rec12["dropped"] == 2
    assert quality.contamination([copy13], None)[0] == [copy13]  # n = 0: off
    with pytest.raises(ValueError, match="n-gram size must be >= 1"):
        NgramIndex.build(EVAL, n=0)


def test_config_keys_validated():
    from fedkt.config import ConfigError

    with pytest.raises(ConfigError, match="fdkt.synthetic_set = 'private' is not allowed"):
        load_config(None, ['fdkt.synthetic_set="private"'])
    with pytest.raises(ConfigError, match="dedup_jaccard must be > 0"):
        load_config(None, ["fdkt.dedup_jaccard=0"])
    with pytest.raises(ConfigError, match="decontaminate_ngram must be >= 0"):
        load_config(None, ["fdkt.decontaminate_ngram=-1"])
    with pytest.raises(ConfigError, match="unknown key fdkt.train_on"):  # merged into synthetic_set
        load_config(None, ['fdkt.train_on="synthetic"'])


def test_saved_synthesis_keeps_kept_and_augmented_apart_and_reads_the_old_format():
    from fedkt.algorithms.fdkt.server import Synthesis

    kept, aug = [mc("Kept?", id="client0-1")], [mc("New?", id="aug-0")]
    syn = Synthesis(kept, aug, {"stages": {}})
    assert syn.examples == kept + aug  # FedCoLLM's auxiliary set: everything synthetic
    back = Synthesis.from_dict(syn.to_dict())
    assert (back.kept, back.augmented) == (kept, aug)
    old = {"examples": [{"task": e.task, "id": e.id, "text": render_mc(e)} for e in aug + kept], "record": {}}
    back = Synthesis.from_dict(old)  # a cache written before issue 22: split by the augmented ids
    assert (back.kept, back.augmented) == (kept, aug)
