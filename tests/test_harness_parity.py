"""fedkt's MC evaluation equals lm-evaluation-harness 0.4.13 by construction: prompts, tokenisation
split, acc_norm. The expected strings below were rendered by the harness itself (its task YAMLs,
``fewshot_context`` and ``construct_requests``) for the same hand-written docs; the harness is not
needed to run these tests."""

import math

import pytest
import torch

from fedkt.data.collate import encode, encode_pair, encode_pairs
from fedkt.data.prompts import choices, context, continuations, training_text
from fedkt.data.tasks import parse_row
from fedkt.evaluate import loglikelihoods, predictions, score_multiple_choice
from fedkt.models import load_model

DOCS = {
    "arc_easy": {"id": "x1", "question": "Which gas do plants take in for photosynthesis?",
                 "choices": {"text": ["oxygen", "carbon dioxide", "café crème", "helium"],
                             "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    "arc_challenge": {"id": "x2", "question": "A student drops a ball. Which force pulls it down?",
                      "choices": {"text": ["friction", "gravity", "magnetism"], "label": ["1", "2", "3"]},
                      "answerKey": "2"},
    "openbookqa": {"id": "x3", "question_stem": "The sun is responsible for",
                   "choices": {"text": ["puppies learning new tricks", "plants sprouting, blooming and wilting",
                                        "the moon's phases", "rain"], "label": ["A", "B", "C", "D"]},
                   "answerKey": "B"},
    "commonsense_qa": {"id": "x4", "question": "Where would you put a plate after washing it?",
                       "question_concept": "plate",
                       "choices": {"text": ["cupboard", "table", "dishwasher", "floor", "restaurant"],
                                   "label": ["A", "B", "C", "D", "E"]}, "answerKey": "A"},
}

# (context, continuations, gold index) as lm-evaluation-harness 0.4.13 renders DOCS
CSQA_CTX = ("Question: Where would you put a plate after washing it?\nA. cupboard\nB. table\nC. dishwasher\n"
            "D. floor\nE. restaurant\nAnswer:")
HARNESS = {
    "arc_easy": ("Question: Which gas do plants take in for photosynthesis?\nAnswer:",
                 [" oxygen", " carbon dioxide", " café crème", " helium"], 1),
    "arc_challenge": ("Question: A student drops a ball. Which force pulls it down?\nAnswer:",
                      [" friction", " gravity", " magnetism"], 1),
    "openbookqa": ("The sun is responsible for",
                   [" puppies learning new tricks", " plants sprouting, blooming and wilting", " the moon's phases",
                    " rain"], 1),
    "commonsense_qa": (CSQA_CTX, [" A", " B", " C", " D", " E"], 0),
}


@pytest.mark.parametrize("task", sorted(DOCS))
def test_prompts_equal_the_harness(task):
    ex = parse_row(DOCS[task], task, "x")
    ctx, conts, gold = HARNESS[task]
    assert context(ex) == ctx
    assert continuations(ex) == conts
    assert ex.answer == gold
    # training prompts are the evaluation prompts with the gold continuation
    assert training_text(ex) == (ctx, conts[gold])


def test_openbookqa_ai2_schema_gives_the_same_prompt():
    row = {"id": "x3", "question": {"stem": "The sun is responsible for", "choices": [
        {"label": "A", "text": "rain"}, {"label": "B", "text": "the moon's phases"}]}, "answerKey": "B"}
    ex = parse_row(row, "openbookqa", "x")
    assert context(ex) == "The sun is responsible for" and continuations(ex) == [" rain", " the moon's phases"]


def test_commonsense_qa_scores_letters_and_normalises_by_one_character():
    ex = parse_row(DOCS["commonsense_qa"], "commonsense_qa", "x")
    assert choices(ex) == ("A", "B", "C", "D", "E")
    assert predictions(ex, [-5.0, -1.0, -2.0, -3.0, -4.0]) == (1, 1)


def test_unknown_tasks_use_the_arc_prompt():
    ex = parse_row({"question": "Q?", "choices": ["a", "b"], "answer": 1}, "my_task", "x")
    assert context(ex) == "Question: Q?\nAnswer:" and continuations(ex) == [" a", " b"]


def test_acc_norm_divides_by_characters_not_bytes(monkeypatch):
    # "éé" is 2 characters but 4 bytes (5 with the delimiter); "abc" is 3 characters and 3 bytes.
    ex = parse_row({"question": "Q?", "choices": ["éé", "abc"], "answer": 1}, "arc_easy", "x")
    lls = [-3.0, -4.0]
    # acc: argmax(-3, -4) = 0. acc_norm by characters: -3/2 = -1.5 < -4/3 = -1.33 -> 1.
    # (by bytes of " " + choice it would be -3/5 = -0.6 > -4/4 = -1.0 -> 0, fedkt's old rule)
    assert predictions(ex, lls) == (0, 1)
    monkeypatch.setattr("fedkt.evaluate.loglikelihoods", lambda model, tok, reqs, **k: list(lls))
    assert score_multiple_choice(None, None, [ex]) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


def test_ties_go_to_the_first_choice_as_np_argmax():
    ex = parse_row({"question": "Q?", "choices": ["ab", "cd", "ef"], "answer": 1}, "arc_easy", "x")
    assert predictions(ex, [-2.0, -1.0, -1.0]) == (1, 1)
    assert predictions(ex, [-1.0, -1.0, -3.0]) == (0, 0)


def test_encode_pair_is_the_harness_split(tok):
    # plain: the continuation is what the joint encoding adds after the context's encoding
    c, k = encode_pair(tok, "Question: Which planet?\nAnswer:", " Mercury")
    assert c == encode(tok, "Question: Which planet?\nAnswer:")
    assert c + k == encode(tok, "Question: Which planet?\nAnswer: Mercury")
    # trailing context whitespace moves to the continuation before encoding
    assert encode_pair(tok, "Answer: ", "Mercury") == encode_pair(tok, "Answer:", " Mercury")
    # a join that merges across the boundary: the harness still cuts the joint encoding at len(context)
    ctx, cont = "carbon di", "oxide"
    whole, cids = encode(tok, ctx + cont), encode(tok, ctx)
    assert whole[:len(cids)] != cids, "pick strings whose join merges tokens in the test tokenizer"
    assert encode_pair(tok, ctx, cont) == (cids, whole[len(cids):])
    # the batched form gives the same pairs, contexts shared
    pairs = [("Answer:", " Mercury"), (ctx, cont), ("Answer:", " Mars")]
    assert encode_pairs(tok, pairs) == [encode_pair(tok, *p) for p in pairs]


@torch.no_grad()
def test_empty_context_is_scored_after_the_bos_token(model_dirs, tok):
    model, _ = load_model(str(model_dirs["slm"]))
    k = encode(tok, " Mercury")
    ids = torch.tensor([[tok.bos_token_id] + k])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    expected = logp[torch.arange(len(k)), torch.tensor(k)].sum().item()
    for method in ("packed", "cache"):
        got = loglikelihoods(model, tok, [("", " Mercury"), ("Answer:", " Mars")], method=method)
        assert math.isclose(got[0], expected, abs_tol=1e-4), method
