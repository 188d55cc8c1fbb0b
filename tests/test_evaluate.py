import torch

from fedkt.data.collate import encode_pair
from fedkt.data.prompts import context, continuations
from fedkt.data.tasks import parse_row
from fedkt.evaluate import loglikelihoods, score_multiple_choice
from fedkt.models import load_model

from conftest import MC_ROWS


def _examples():
    return [parse_row({"id": str(i), "question": q, "choices": {"text": ch, "label": [chr(65 + j) for j in range(len(ch))]},
                       "answerKey": k}, "arc_easy", str(i)) for i, (q, ch, k) in enumerate(MC_ROWS * 2)]


@torch.no_grad()
def naive_loglikelihood(model, tok, ctx, cont):
    c, k = encode_pair(tok, ctx, cont)
    ids = torch.tensor([c + k])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets][-len(k):].sum().item()


def test_batched_mc_scoring_equals_naive_loop(model_dirs, tok):
    model, _ = load_model(str(model_dirs["llm"]))
    exs = _examples()
    requests = [(context(e), c) for e in exs for c in continuations(e)]
    naive = torch.tensor([naive_loglikelihood(model, tok, *r) for r in requests])
    for bs in (1, 2, 5, 64):  # fewer rows than one question's choices, uneven chunks, one chunk
        for share in (True, False):
            for method in ("packed", "cache"):
                batched = loglikelihoods(model, tok, requests, batch_size=bs, share_context=share, method=method)
                assert torch.allclose(torch.tensor(batched), naive, atol=1e-4), (bs, share, method)
    # and the accuracy is the argmax of the naive scores
    res = score_multiple_choice(model, tok, exs, batch_size=7)
    i, correct, correct_norm = 0, 0, 0
    for e in exs:
        s = naive[i:i + len(e.choices)]
        n = [x / len(c) for x, c in zip(s, e.choices)]  # characters of the choice, as the harness
        correct += max(range(len(s)), key=s.__getitem__) == e.answer
        correct_norm += max(range(len(n)), key=n.__getitem__) == e.answer
        i += len(e.choices)
    assert res == {"acc": correct / len(exs), "acc_norm": correct_norm / len(exs), "n": len(exs)}


def test_generation_exact_match(model_dirs, tok, monkeypatch):
    from fedkt import evaluate as ev

    model, _ = load_model(str(model_dirs["slm"]))
    exs = [parse_row({"question": "q1", "answer": "x\n#### 12"}, "gsm8k", "a"),
           parse_row({"question": "q2", "answer": "y\n#### 7"}, "gsm8k", "b")]
    monkeypatch.setattr("fedkt.evaluate.generate", lambda *a, **k: ["so it is 12", "The answer is 8."])
    assert ev.score_generation(model, tok, exs) == {"acc": 0.5, "exact_match": 0.5, "n": 2}
    # real generation runs and returns a score in [0, 1]
    monkeypatch.undo()
    r = ev.evaluate(model, tok, exs, max_new_tokens=4)
    assert r["n"] == 2 and 0.0 <= r["acc"] <= 1.0


class CountingForward:
    """Records the batch shape of every forward of ``model``."""

    def __init__(self, model):
        self.model, self.inner, self.shapes = model, model.forward, []

    def __enter__(self):
        def forward(*a, **k):
            self.shapes.append(tuple(k["input_ids"].shape))
            return self.inner(*a, **k)

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


def test_lettered_choices_score_from_one_pass_per_question(model_dirs, tok):
    """Single-token continuations (CommonsenseQA's letters " A", " B", ... with a real tokenizer; here the
    four words the tiny BPE keeps whole after a space): every question's context runs once, in one row, and
    its choices' scores equal the naive per-choice loop; a request list mixing single- and multi-token
    questions scores both kinds right."""
    model, _ = load_model(str(model_dirs["llm"]))
    words = ["is", "so", "to", "Wh"]  # " is", " so", ... are one token each in the test tokenizer
    rows = [{"id": str(i), "question": q, "choices": {"text": words[:len(ch)], "label": list("ABCD")[:len(ch)]},
             "answerKey": k} for i, (q, ch, k) in enumerate(MC_ROWS * 2)]
    lettered = [parse_row(r, "arc_easy", r["id"]) for r in rows]
    requests = [(context(e), c) for e in lettered for c in continuations(e)]
    assert all(len(encode_pair(tok, *r)[1]) == 1 for r in requests)  # single-token continuations
    assert len({len(encode_pair(tok, *r)[0]) for r in requests}) >= 3  # contexts of several lengths: padding
    naive = torch.tensor([naive_loglikelihood(model, tok, *r) for r in requests])
    for bs in (1, 3, 64):
        with CountingForward(model) as c:
            fast = loglikelihoods(model, tok, requests, batch_size=bs)
        assert torch.allclose(torch.tensor(fast), naive, atol=1e-4), bs
        # one row per distinct context (a repeated question shares it), no separate rows for the choices
        n_ctx = len({context(e) for e in lettered})
        assert n_ctx < len(lettered) and len(c.shapes) == -(-n_ctx // bs)
        assert sum(b for b, _ in c.shapes) == n_ctx and max(b for b, _ in c.shapes) == min(bs, n_ctx)
        slow = loglikelihoods(model, tok, requests, batch_size=bs, fast_single=False)
        assert torch.allclose(torch.tensor(slow), torch.tensor(fast), atol=1e-4), bs
    res = score_multiple_choice(model, tok, lettered, batch_size=4)
    i, correct = 0, 0
    for e in lettered:
        s = naive[i:i + len(e.choices)]
        correct += max(range(len(s)), key=s.__getitem__) == e.answer
        i += len(e.choices)
    assert res["acc"] == correct / len(lettered)
    mixed = [(context(e), c) for e in _examples()[:3] for c in continuations(e)] + requests[:7]
    ref = torch.tensor([naive_loglikelihood(model, tok, *r) for r in mixed])
    for share in (True, False):
        got = loglikelihoods(model, tok, mixed, batch_size=4, share_context=share)
        assert torch.allclose(torch.tensor(got), ref, atol=1e-4), share


def test_batches_stop_before_they_become_mostly_padding(model_dirs, tok):
    """One long context and short ones, batch size 8: the long one runs alone (with it, the short rows
    would make the batch under MIN_FILL real tokens), the short ones together; scores unchanged."""
    from fedkt import evaluate as ev

    model, _ = load_model(str(model_dirs["llm"]))
    long_ctx = "Question: " + " ".join(["which planet is closest to the Sun"] * 6) + "\nAnswer:"
    requests = [(long_ctx, " is")] + [(f"Question: q{i}?\nAnswer:", " so") for i in range(5)]
    lengths = [len(encode_pair(tok, *r)[0]) for r in requests]
    assert lengths[0] > 4 * max(lengths[1:])
    with CountingForward(model) as c:
        got = loglikelihoods(model, tok, requests, batch_size=8)
    assert [b for b, _ in c.shapes] == [1, 5] and c.shapes[0][1] == lengths[0]
    assert sum(lengths[1:]) >= ev.MIN_FILL * 5 * c.shapes[1][1]
    naive = torch.tensor([naive_loglikelihood(model, tok, *r) for r in requests])
    assert torch.allclose(torch.tensor(got), naive, atol=1e-4)


def test_packed_rows_hold_each_token_once_and_batches_as_many_as_the_harness_rows(model_dirs, tok):
    """A packed row is the context plus each choice but its last token (a target only); the LM head sees
    the context's last position once per question and each choice's other positions; a batch holds as many
    questions as fit in the padded tokens of ``batch_size`` single (context, choice) rows as wide as its
    widest one; scores equal the naive per-choice loop."""
    model, _ = load_model(str(model_dirs["llm"]))
    exs = _examples()[:len(MC_ROWS)]  # distinct questions (a repeated one would share its context)
    requests = [(context(e), c) for e in exs for c in continuations(e)]
    enc = [encode_pair(tok, *r) for r in requests]
    per_q, i = [], 0
    for e in exs:
        pairs = enc[i:i + len(e.choices)]
        i += len(e.choices)
        assert all(c == pairs[0][0] for c, _ in pairs) and any(len(k) > 1 for _, k in pairs)
        per_q.append((len(pairs[0][0]) + sum(len(k) - 1 for _, k in pairs),  # packed row
                      max(len(pairs[0][0]) + len(k) for _, k in pairs),  # widest single row
                      1 + sum(len(k) - 1 for _, k in pairs)))  # LM head positions
    naive = torch.tensor([naive_loglikelihood(model, tok, *r) for r in requests])
    head = model.get_output_embeddings()
    for bs in (1, 3, 8):
        seen = []
        hook = head.register_forward_hook(lambda _m, _a, out: seen.append(out.shape[0]))
        try:
            with CountingForward(model) as c:
                got = loglikelihoods(model, tok, requests, batch_size=bs, method="packed")
        finally:
            hook.remove()
        assert torch.allclose(torch.tensor(got), naive, atol=1e-4), bs
        assert sum(seen) == sum(h for _, _, h in per_q)
        assert sum(b for b, _ in c.shapes) == len(exs)  # one row per question
        assert max(w for _, w in c.shapes) == max(p for p, _, _ in per_q)
        for b, w in c.shapes:
            assert b == 1 or b * w <= bs * max(s for _, s, _ in per_q)
    # at batch size 8 a batch holds more questions than 8 continuation rows would (2 of 3-4 choices)
    with CountingForward(model) as c:
        loglikelihoods(model, tok, requests, batch_size=8, method="packed")
    assert max(b for b, _ in c.shapes) > 8 // min(len(e.choices) for e in exs)
