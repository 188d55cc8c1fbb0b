"""Parsers for model-written multiple-choice examples and index lists: exact cases, round trips, and
seeded fuzzing (no exception escapes, nothing invalid gets through)."""

from __future__ import annotations

import random
import re
import unicodedata

import pytest

from fedkt.data.synthetic import (LETTERS, MAX_CHOICE_CHARS, MAX_CHOICES, MAX_QUESTION_CHARS, MIN_CHOICES,
                                  ParseStats, make_mc, mc_problem, normalize, parse_indices, parse_many,
                                  parse_mc, render_mc)
from fedkt.data.tasks import Example

WORDS = ("the of plants water light energy which gas sun planet rock heat what why how is a an "
         "carbon dioxide oxygen mercury gravity force 42 3.5 x-ray A B C D answer question").split()
ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz",
    "αβγδεζηθικλμνξοπρστυφχψω",
    "日本語の質問と答え水光熱",
    "éèêàçüöñøåß",
    "😀🌱🔥💧⚡",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789?!.,;()-+=%$#'\"",
]


def check(ex: Example) -> None:
    """Everything a returned example must satisfy."""
    assert isinstance(ex, Example) and ex.is_mc
    assert MIN_CHOICES <= len(ex.choices) <= MAX_CHOICES
    assert 0 <= ex.answer < len(ex.choices)
    assert ex.target == ex.choices[ex.answer] and ex.label == str(ex.answer)
    assert ex.question and ex.question == normalize(ex.question) and len(ex.question) <= MAX_QUESTION_CHARS
    for c in ex.choices:
        assert c and c == normalize(c) and len(c) <= MAX_CHOICE_CHARS
    assert len({c.casefold() for c in ex.choices}) == len(ex.choices)
    for t in (ex.question, *ex.choices):
        assert not re.search(r"\b(?:answer|question)\s*:", t, re.I)
        assert not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in t)
    assert mc_problem(ex) is None


def phrase(rng: random.Random, lo: int, hi: int) -> str:
    if rng.random() < 0.5:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    alpha = rng.choice(ALPHABETS)
    return " ".join("".join(rng.choice(alpha) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(lo, hi)))


def valid_example(rng: random.Random, i: int = 0) -> Example:
    while True:
        n = rng.randint(MIN_CHOICES, MAX_CHOICES)
        ex = make_mc(phrase(rng, 1, 15) + rng.choice(["?", "", "."]), [phrase(rng, 1, 4) for _ in range(n)],
                     rng.randrange(n), task=rng.choice(["synthetic", "arc_easy"]), id=f"ex{i}")
        if mc_problem(ex) is None:
            return ex


# --------------------------------------------------------------------------------------------------
# exact cases


def test_template_is_exact():
    ex = make_mc("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "water"], 1, id="q1")
    text = render_mc(ex)
    assert text == ("Question: Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nC. helium\nD. water\n"
                    "Answer: B")
    assert parse_mc(text, id="q1") == ex
    assert ex.target == "carbon dioxide" and ex.label == "1"
    with pytest.raises(ValueError, match="no choices"):
        render_mc(Example("gsm8k", "g", "2+2?", target="4", label="4"))


@pytest.mark.parametrize("text", [
    "**Question 1:** Which gas do plants take in?\n(A) oxygen\n(B) carbon dioxide\n(C) helium\n\nAnswer: (b)",
    "Sure! Here is one.\n\nQuestion:\nWhich gas do plants\ntake in?\nA) oxygen\nB) carbon dioxide\nC) helium\n"
    "Correct answer: B. Carbon  dioxide.\nExplanation: photosynthesis uses CO2.",
    "question: Which gas do plants take in?\nA: oxygen\nB: carbon dioxide\nC: helium\nanswer: carbon dioxide",
    "  Question:   Which gas   do plants take in?  \n  A.  oxygen \n\n B. carbon dioxide\n C. helium\n Answer: B\n",
])
def test_accepted_variants(text):
    want = make_mc("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium"], 1)
    assert parse_mc(text) == want


def base_lines(n: int = 4, answer: str = "B") -> list[str]:
    return ["Question: What is the largest planet?"] + [f"{LETTERS[i]}. planet {i}" for i in range(n)] + [
        f"Answer: {answer}"]


REJECTS = {
    "no_question": "A. x\nB. y\nC. z\nAnswer: A",
    "multiple_questions": render_mc(make_mc("q1", "abc", 0)) + "\n" + render_mc(make_mc("q2", "abc", 1)),
    "no_choices": "Question: What is the largest planet?\nAnswer: Jupiter",
    "no_answer": "\n".join(base_lines()[:-1]),
    "empty_answer": "\n".join(base_lines(answer="")),
    "answer_not_a_choice": "\n".join(base_lines(answer="E")),
    "answer_text_mismatch": "\n".join(base_lines(answer="B. planet 3")),
    "bad_answer": "\n".join(base_lines(answer="Jupiter, obviously")),
    "too_few_choices": "\n".join(base_lines(2, "A")),
    "too_many_choices": "\n".join(base_lines(20, "C")),
    "duplicate_choices": "Question: q?\nA. Red  Apple\nB. green\nC. red apple\nAnswer: B",
    "empty_choice": "Question: q?\nA. red\nB.\nC. blue\nAnswer: A",
    "choice_labels_out_of_order": "Question: q?\nA. red\nC. green\nB. blue\nAnswer: A",
    "unexpected_line": "Question: q?\nA. red\nsome comment\nB. green\nC. blue\nAnswer: A",
    "empty_question": "Question:\nA. red\nB. green\nC. blue\nAnswer: A",
    "question_too_long": "Question: " + "word " * 300 + "\nA. red\nB. green\nC. blue\nAnswer: A",
    "choice_too_long": "Question: q?\nA. " + "red " * 100 + "\nB. green\nC. blue\nAnswer: A",
    "marker_in_question": "Question: Which is red? Answer: A\nA. red\nB. green\nC. blue\nAnswer: A",
    "marker_in_choice": "Question: q?\nA. red\nB. green (Question: why)\nC. blue\nAnswer: A",
    "control_character": "Question: q?\nA. red\x00\nB. green\nC. blue\nAnswer: A",
}


@pytest.mark.parametrize("reason", sorted(REJECTS))
def test_rejects_with_reason(reason):
    stats = ParseStats()
    assert parse_mc(REJECTS[reason], stats=stats) is None
    assert stats.accepted == 0 and dict(stats.rejected) == {reason: 1}


def test_nested_answer_line_before_choices_is_rejected():
    # an "Answer:" line inside the question (before any choice) leaks an answer: rejected
    text = "Question: Which is red?\nAnswer: A\nA. red\nB. green\nC. blue\nAnswer: A"
    stats = ParseStats()
    assert parse_mc(text, stats=stats) is None and dict(stats.rejected) == {"marker_in_question": 1}


def test_parse_many_keeps_valid_blocks_in_order_and_counts_the_rest():
    good = [make_mc(f"question {i}?", [f"c{i}{j}" for j in range(3 + i % 3)], i % 3) for i in range(4)]
    text = ("Here are some examples.\n\n" + render_mc(good[0]) + "\nExplanation: because.\n\n"
            + REJECTS["duplicate_choices"] + "\n" + render_mc(good[1]) + "\n" + REJECTS["too_many_choices"]
            + "\n\n" + render_mc(good[2]) + "\n" + REJECTS["no_answer"] + "\n" + render_mc(good[3]))
    stats = ParseStats()
    got = parse_many(text, id_prefix="c1-", stats=stats)
    assert got == [Example(g.task, f"c1-{i}", g.question, g.choices, g.answer, g.target, g.label)
                   for i, g in enumerate(good)]
    assert stats.accepted == 4 and stats.total == 7
    assert dict(stats.rejected) == {"duplicate_choices": 1, "too_many_choices": 1, "no_answer": 1}
    more = ParseStats()
    parse_many("nothing here", stats=more)
    stats.merge(more)
    assert stats.to_dict() == {"accepted": 4, "rejected": {"duplicate_choices": 1, "no_answer": 1,
                                                           "no_question": 1, "too_many_choices": 1}}


# --------------------------------------------------------------------------------------------------
# fuzzing (seeded)


def test_round_trip_of_random_valid_examples():
    rng = random.Random(0)
    for i in range(1500):
        ex = valid_example(rng, i)
        assert parse_mc(render_mc(ex), task=ex.task, id=ex.id) == ex
        assert parse_many(render_mc(ex), task=ex.task, id_prefix="ex") == [
            Example(ex.task, "ex0", ex.question, ex.choices, ex.answer, ex.target, ex.label)]


def restyle(rng: random.Random, ex: Example) -> str:
    """The same example in one of the accepted surface variants."""
    head = rng.choice(["Question: ", "**Question:** ", "Question 7: ", "question:\n", "### Question: "])
    style = rng.choice(["{L}. {c}", "{L}) {c}", "({L}) {c}", "{L}: {c}"])
    lines = [head + ex.question] + [style.format(L=LETTERS[i], c=c) for i, c in enumerate(ex.choices)]
    gold = ex.choices[ex.answer]
    ans = rng.choice([LETTERS[ex.answer], LETTERS[ex.answer].lower(), f"({LETTERS[ex.answer]})",
                      f"{LETTERS[ex.answer]}. {gold}", f"**{LETTERS[ex.answer]}**"])
    lines.append(rng.choice(["Answer: ", "Correct answer: ", "**Answer:** "]) + ans)
    out: list[str] = []
    for line in lines:  # blank lines and stray spaces anywhere after the header
        out.append(line if rng.random() < 0.5 else "  " + line + " \t")
        if rng.random() < 0.3:
            out.append(rng.choice(["", "   "]))
    return rng.choice(["", "Sure, here it is:\n\n"]) + "\n".join(out) + rng.choice(["", "\nExplanation: obvious."])


def test_restyled_examples_parse_to_the_same_example():
    rng = random.Random(1)
    for i in range(1500):
        ex = valid_example(rng, i)
        text = restyle(rng, ex)
        got = parse_mc(text, task=ex.task, id=ex.id)
        if got != ex:
            pytest.fail(f"restyled example did not parse back:\n{text!r}\n{got}")


def test_truncated_examples_never_parse():
    rng = random.Random(2)
    stats = ParseStats()
    for i in range(600):
        ex = valid_example(rng, i)
        text = render_mc(ex)
        for cut in {rng.randrange(len(text)) for _ in range(6)} | {len(text) - 1}:
            assert parse_mc(text[:cut], stats=stats) is None  # the answer letter is the last character
    assert stats.accepted == 0 and stats.total > 3000


def mutate(rng: random.Random, ex: Example) -> tuple[str, str]:
    """An invalid variant of a valid example and the reason it must be rejected for."""
    lines = render_mc(ex).split("\n")
    n = len(ex.choices)
    kind = rng.randrange(9)
    if kind == 0:
        lines[-1] = f"Answer: {LETTERS[n + rng.randrange(26 - n)]}"
        return "\n".join(lines), "answer_not_a_choice"
    if kind == 1:
        i, j = rng.sample(range(n), 2)
        variant = rng.choice([str.upper, str.lower, lambda s: "  " + s.replace(" ", "   ") + " "])
        lines[1 + j] = f"{LETTERS[j]}. {variant(ex.choices[i])}"
        return "\n".join(lines), "duplicate_choices"
    if kind == 2:
        k = rng.randint(MAX_CHOICES + 1, 26)
        body = [f"{LETTERS[i]}. option {i}" for i in range(k)]
        return "\n".join([lines[0], *body, f"Answer: {LETTERS[rng.randrange(k)]}"]), "too_many_choices"
    if kind == 3:
        lines[0] += rng.choice([" Answer: B", " (answer: A)", " ANSWER :C", " question: again"])
        return "\n".join(lines), "marker_in_question"
    if kind == 4:
        del lines[-1]
        return "\n".join(lines), "no_answer"
    if kind == 5:
        i = rng.randrange(n)
        lines[1 + i] = f"{LETTERS[i]}." + rng.choice(["", " ", "   "])
        return "\n".join(lines), "empty_choice"
    if kind == 6:
        i = rng.randrange(n - 1)
        lines[1 + i], lines[2 + i] = lines[2 + i], lines[1 + i]
        return "\n".join(lines), "choice_labels_out_of_order"
    if kind == 7:
        keep = rng.randint(0, MIN_CHOICES - 1)
        return "\n".join([lines[0], *lines[1:1 + keep], "Answer: A"]), "too_few_choices" if keep else "no_choices"
    i = rng.randrange(n)
    lines[1 + i] += rng.choice(["\x00", "\x07", "\ud800", "\x1b[31m"])
    return "\n".join(lines), "control_character"


def test_adversarial_mutations_are_rejected_for_the_right_reason():
    rng = random.Random(3)
    seen = ParseStats()
    for i in range(2000):
        ex = valid_example(rng, i)
        text, reason = mutate(rng, ex)
        stats = ParseStats()
        assert parse_mc(text, stats=stats) is None, text
        assert dict(stats.rejected) == {reason: 1}, (text, stats.rejected)
        seen.merge(stats)
    assert len(seen.rejected) == 10 and seen.accepted == 0


def soup(rng: random.Random) -> str:
    parts = ["Question:", "Question 2:", "**Question:**", "Answer:", "Answer: B", "answer: a", "A.", "B)", "(C)",
             "D:", "E.", "\n", "\n", "\n", " ", "  ", "**", "?", "red", "green", "blue", "Red", "x" * 50, "\t",
             "\x00", "\r\n", "\u2028", "é", "日本", "😀", "1", "-", ":"]
    return "".join(rng.choice(parts) for _ in range(rng.randint(0, 60)))


def random_unicode(rng: random.Random) -> str:
    return "".join(chr(rng.randrange(0x110000)) if rng.random() < 0.7 else rng.choice("\nQA.: ")
                   for _ in range(rng.randint(0, 200)))


@pytest.mark.parametrize("gen", [soup, random_unicode, lambda r: "".join(chr(r.randrange(32, 127)) + "\n" *
                                                                          (r.random() < .1)
                                                                          for _ in range(r.randint(0, 300)))])
def test_random_text_never_raises_and_never_yields_invalid(gen):
    rng = random.Random(4)
    stats = ParseStats()
    for i in range(1500):
        text = gen(rng)
        ex = parse_mc(text, stats=stats)
        if ex is not None:
            check(ex)
            assert parse_mc(render_mc(ex)) == ex  # what parses renders and parses back the same
        for e in parse_many(text, stats=stats):
            check(e)
        got = parse_indices(text, 5)
        assert got <= set(range(5))
    assert stats.total >= 3000


def test_valid_blocks_inside_random_junk_are_found():
    rng = random.Random(5)
    for _ in range(300):
        good = [valid_example(rng, i) for i in range(rng.randint(1, 4))]
        chunks = []
        for ex in good:
            chunks.append(rng.choice(["", "Some words.", "Explanation: x.", "\n\n", "1. ", "---"]))
            chunks.append(render_mc(ex))
        got = parse_many("\n".join(chunks), id_prefix="")
        assert [(g.question, g.choices, g.answer) for g in got] == [(e.question, e.choices, e.answer) for e in good]
        for g in got:
            check(g)


# --------------------------------------------------------------------------------------------------
# "which samples are eligible?" answers


@pytest.mark.parametrize("text,want", [
    ("1, 3, 4", {0, 2, 3}),
    ("[1,3]", {0, 2}),
    ("Samples 2 and 5", {1, 4}),
    ("Sample 1, Sample 3.", {0, 2}),
    ("2-4", {1, 2, 3}),
    ("#1 & #5", {0, 4}),
    ("The eligible samples are:\n- Sample 1\n- Sample 3", {0, 2}),
    ("Eligible: 1, 3\nSample 2 is not eligible because it has two choices.", {0, 2}),
    ("**Answer:** [2, 4]", {1, 3}),
    ("None", set()),
    ("No samples are eligible.", set()),
    ("All", {0, 1, 2, 3, 4}),
    ("All samples are eligible.", {0, 1, 2, 3, 4}),
    ("1, 3, 6", set()),  # 6 is out of range: the whole answer is malformed
    ("0, 1", set()),  # numbered from 1
    ("1.5", set()),
    ("3 is eligible because it has 4 choices", set()),
    ("none except 3", set()),
    ("all but 2", set()),
    ("one and three", set()),
    ("", set()),
    ("99999999999999999999", set()),
    ("1-100000000", set()),
    ("4-2", set()),
])
def test_parse_indices_cases(text, want):
    assert parse_indices(text, 5) == want


def test_parse_indices_base_zero_and_no_candidates():
    assert parse_indices("0, 4", 5, base=0) == {0, 4}
    assert parse_indices("5", 5, base=0) == set()
    assert parse_indices("1", 0) == set()


def test_parse_indices_fuzz_round_trip():
    rng = random.Random(6)
    for _ in range(2000):
        n = rng.randint(1, 30)
        pick = set(rng.sample(range(n), rng.randint(1, n)))
        nums = [str(k + 1) for k in sorted(pick)]
        rng.shuffle(nums)
        body = rng.choice([", ", ",", " and ", "; ", " "]).join(
            rng.choice(["", "Sample ", "#"]) + x for x in nums)
        text = rng.choice(["{}", "[{}]", "Samples {}", "Eligible samples: {}.", "Answer: {}", "({})"]).format(body)
        assert parse_indices(text, n) == pick, text


def test_pathological_inputs_are_parsed_in_linear_time():
    import time

    k = 100_000
    texts = ["*" * k + "x", " " * k + "x", "Question" + " " * k + "x", "Question: q\nA." + " " * k + "x",
             "Question: q\nA. a\nB. b\nC. c\nAnswer:" + "* " * k + "x", "1" * k + "-", "1," * k + "x",
             "Question: q\n" + "A. a\n" * (k // 10) + "Answer: A", ("Question: q\n" * (k // 20))]
    t = time.perf_counter()
    for text in texts:
        assert parse_mc(text) is None
        parse_many(text)
        assert parse_indices(text, 5) == set()
    assert time.perf_counter() - t < 5.0  # quadratic backtracking would take minutes
