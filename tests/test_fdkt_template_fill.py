"""FDKT's cached template filling (``fedkt.algorithms.fdkt.template_fill``): one prefill per prompt, each
field continuing from the KV cache. Checked against a reference that recomputes the whole token sequence
without any cache, row by row; batch invariance; forward/prefill counts against the uncached path."""

from __future__ import annotations

import torch

from conftest import make_llama, make_tokenizer
from fedkt import generate as G
from fedkt.algorithms.fdkt import template_fill
from fedkt.algorithms.fdkt.template_fill import FillStats, fill_mc_template_cached, sample as nucleus_sample
from fedkt.data.synthetic import LETTERS, fill_mc_template, normalize
from fedkt.seeds import derive_seed

PROMPTS = ["Write a multiple-choice question for a grade-school science test. The correct answer is B.\nQuestion:",
           "Question:", "Which planet is closest to the Sun? Water boils at 100 degrees.\nQuestion:",
           "A B C D 1 2 3\nQuestion:", "oxygen nitrogen helium\nQuestion:"]


class Biased(torch.nn.Module):
    """A tiny model whose logits favour tokens holding a newline (and EOS), so fields end at the stop
    string, by EOS and at their token limit: every way a field can end."""

    def __init__(self, inner, bias):
        super().__init__()
        self.inner, self.generation_config = inner, inner.generation_config
        self.register_buffer("bias", bias)

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = out.logits + self.bias
        return out


def biased_model(tok, newline=3.0, eos=1.0):
    model = make_llama(tok, layers=2, init_range=0.5)
    bias = torch.zeros(len(tok))
    for i in range(len(tok)):
        if "\n" in tok.decode([i]):
            bias[i] = newline
    bias[tok.eos_token_id] = eos
    return Biased(model, bias).eval()


def reference(model, tok, prompts, answers, n_choices, qt, ct, sample=None):
    """Row by row, no KV cache: the full id sequence is run again for every token. A field ends when its
    text holds a newline, at EOS or at its limit; the next field is fed the unseen rest of the last token up
    to the newline, then the template's label, tokenized on their own."""
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    fields = [("question", "", qt)] + [(f"choice-{LETTERS[i]}", f"\n{LETTERS[i]}.", ct) for i in range(n_choices)] + [
        ("answer", "\nAnswer:", 3)]
    eos = set(G.eos_token_ids(model, tok))
    out, counts = [None] * len(prompts), [None] * len(prompts)
    for i in order:
        seq, tail, texts, n = list(ids[i]), "", [], []
        for tag, lead, limit in fields:
            if tag == "answer" and answers[i] is not None:
                break
            seq += tok(tail + lead, add_special_tokens=False)["input_ids"] if texts else []
            made = []
            while True:
                logits = model(input_ids=torch.tensor([seq + made])).logits[:, -1, :]
                t = int(sample(tag, logits)) if sample else int(logits.argmax(-1))
                made.append(t)
                if t in eos or "\n" in tok.decode(made, skip_special_tokens=True) or len(made) >= limit:
                    break
            text = tok.decode(made, skip_special_tokens=True).split("\n")[0]
            seen = tok.decode(made[:-1], skip_special_tokens=True)
            tail = text[len(seen):] if text.startswith(seen) else ""
            seq += made[:-1]
            texts.append(text)
            n.append(len(made))
        body = " " + normalize(texts[0]) + "".join(f"\n{LETTERS[k]}. " + normalize(texts[1 + k]) for k in range(n_choices))
        out[i] = body + "\nAnswer: " + (normalize(texts[-1]) if answers[i] is None else answers[i])
        counts[i] = n
    return out, counts


@torch.no_grad()
def test_cached_greedy_equals_the_uncached_reference_in_any_batch():
    tok = make_tokenizer()
    model = biased_model(tok)
    answers = [None, "B", None, "C", None]
    ref, ref_counts = reference(model, tok, PROMPTS, answers, 3, 12, 6)
    ends = [c for row in ref_counts for c in row]
    assert any(c < 6 for c in ends) and 6 in ends and 12 in ends  # fields end early and at their limits
    for bs in (1, 2, 16):
        st = FillStats()
        got = fill_mc_template_cached(model, tok, PROMPTS, answers, n_choices=3, question_tokens=12, choice_tokens=6,
                                      batch_size=bs, temperature=0.0, stats=st)
        assert got == ref, bs
        assert st.field_tokens == ref_counts
        assert [o.rsplit("\nAnswer: ", 1)[1] for o in got][1::2] == ["B", "C"]
        # a batch's prompts are prefilled in length groups, then one feed per field boundary (3 choices; the
        # answer for 3 rows only)
        lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
        batches = [sorted(range(5), key=lambda i: -lengths[i])[b:b + bs] for b in range(0, 5, bs)]
        groups = [len(G._prefill_groups([lengths[i] for i in b])) for b in batches]
        boundaries = sum(3 + any(answers[i] is None for i in b) for b in batches)
        assert st.prefill_calls == sum(groups) + boundaries
        assert bs < 16 or groups == [2]  # one batch, two groups: prompts of 72 and 45 tokens; 18, 16 and 2
        assert st.new_tokens == sum(ends)


@torch.no_grad()
def test_cached_sampling_equals_the_reference_drawing_from_one_generator_per_field():
    tok = make_tokenizer()
    model = biased_model(tok, newline=2.0)
    gens = {}

    def seed_for(tag):
        return derive_seed(7, tag)

    def sample(tag, logits):
        g = gens.setdefault(tag, torch.Generator().manual_seed(seed_for(tag)))
        return nucleus_sample(logits, 0.9, 0, 0.95, g)

    ref, ref_counts = reference(model, tok, PROMPTS, [None] * 5, 4, 10, 5, sample=sample)
    got = fill_mc_template_cached(model, tok, PROMPTS, None, n_choices=4, question_tokens=10, choice_tokens=5,
                                  batch_size=1, temperature=0.9, top_p=0.95, seed_for=seed_for)
    assert got == ref
    again = fill_mc_template_cached(model, tok, PROMPTS, None, n_choices=4, question_tokens=10, choice_tokens=5,
                                    batch_size=3, temperature=0.9, top_p=0.95, seed_for=seed_for)
    assert again == fill_mc_template_cached(model, tok, PROMPTS, None, n_choices=4, question_tokens=10,
                                            choice_tokens=5, batch_size=3, temperature=0.9, top_p=0.95,
                                            seed_for=seed_for)  # reproducible given seeds and batch size
    other = fill_mc_template_cached(model, tok, PROMPTS, None, n_choices=4, question_tokens=10, choice_tokens=5,
                                    batch_size=1, temperature=0.9, top_p=0.95, seed_for=lambda t: derive_seed(8, t))
    assert other != got


@torch.no_grad()
def test_the_prompt_is_prefilled_once_instead_of_once_per_field():
    """The uncached path (``fill_mc_template`` over ``generate_ex``) prefills prompt + fields so far for
    every field; the cached one feeds each prompt token once."""
    tok = make_tokenizer()
    model = biased_model(tok)
    prompt_tokens = sum(len(r) for r in tok(PROMPTS, add_special_tokens=False)["input_ids"])
    fed = []

    def complete(ps, max_new, stop, tag):
        res = G.generate_ex(model, tok, ps, max_new_tokens=max_new, batch_size=16, stop=stop)
        fed.append((sum(len(r) for r in tok(ps, add_special_tokens=False)["input_ids"]), res.forward_calls))
        return res.texts

    fill_mc_template(complete, PROMPTS, None, n_choices=4, question_tokens=12, choice_tokens=6)
    st = FillStats()
    fill_mc_template_cached(model, tok, PROMPTS, None, n_choices=4, question_tokens=12, choice_tokens=6,
                            batch_size=16, temperature=0.0, stats=st)
    assert len(fed) == 6 and fed[0][0] == prompt_tokens
    uncached_prefill = sum(n for n, _ in fed)  # prompt tokens fed again by every one of the 6 calls
    assert uncached_prefill > 6 * prompt_tokens
    lengths = sorted((len(r) for r in tok(PROMPTS, add_special_tokens=False)["input_ids"]), reverse=True)
    assert st.prefill_calls == 2 + 5 == len(G._prefill_groups(lengths)) + 5  # 2 length groups + 5 field boundaries
    # each prompt token once, each sampled token once (the last of each field only as its unseen rest),
    # and the labels: at most (1 rest + 3 label) tokens per row and boundary
    assert prompt_tokens + st.new_tokens - 5 * 6 <= st.input_tokens <= prompt_tokens + st.new_tokens + 5 * 5 * 4
    assert st.input_tokens < uncached_prefill / 2


def test_nucleus_sampling_without_a_full_sort_keeps_the_same_nucleus(monkeypatch):
    """Draws of ``sample`` lie in the nucleus ``fedkt.generate._sample`` keeps (found by sorting the whole
    vocabulary), for a peaked row (nucleus among the top tokens) and a flat one (the sorted fallback);
    frequencies follow the renormalised probabilities; the fallback is taken only for the flat row."""
    torch.manual_seed(0)
    v = 3000
    peaked = torch.randn(v) * 0.5 - 6.0
    peaked[:5] = torch.tensor([6.0, 5.5, 5.0, 3.0, 2.0])
    logits = torch.stack([peaked, torch.zeros(v)])  # row 1: uniform, its 0.9-nucleus holds 2,700 tokens
    probs = logits.softmax(-1)
    s, order = probs.sort(-1, descending=True)
    before = s.cumsum(-1) - s
    nucleus = [set(order[r][before[r] < 0.9].tolist()) for r in range(2)]
    assert len(nucleus[1]) == 2700 and len(nucleus[0]) < template_fill.NUCLEUS_TOP
    fallback_rows = []
    orig = G._sample
    monkeypatch.setattr(G, "_sample", lambda lg, *a: fallback_rows.append(lg.shape[0]) or orig(lg, *a))
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(v)
    for _ in range(400):
        t = nucleus_sample(logits, 1.0, 0, 0.9, g)
        assert int(t[0]) in nucleus[0] and int(t[1]) in nucleus[1]
        counts[int(t[0])] += 1
    assert fallback_rows == [1] * 400  # the flat row only
    want = probs[0] * torch.tensor([i in nucleus[0] for i in range(v)])
    want = want / want.sum()
    assert (counts / 400 - want).abs().max() < 0.08  # 400 draws: 4 standard errors at p = 0.5


@torch.no_grad()
def test_a_sliding_window_cache_takes_the_uncached_path():
    """Mistral with a sliding window keeps DynamicSlidingWindowLayer caches, whose rows the filler cannot
    park and rejoin: it falls back to ``fill_mc_template`` over ``fedkt.generate`` (same greedy texts)."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=4, pad_token_id=tok.pad_token_id,
                                             eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).eval()

    def complete(ps, max_new, stop, tag):
        return G.generate(model, tok, ps, max_new_tokens=max_new, batch_size=2, stop=stop)

    st = FillStats()
    got = fill_mc_template_cached(model, tok, PROMPTS[:3], None, n_choices=3, question_tokens=6, choice_tokens=4,
                                  batch_size=2, temperature=0.0, stats=st)
    assert got == fill_mc_template(complete, PROMPTS[:3], None, n_choices=3, question_tokens=6, choice_tokens=4)
    assert st.prefill_calls == 0  # nothing ran through the cached path


@torch.no_grad()
def test_rows_riding_along_and_a_growing_cache_change_no_text(monkeypatch):
    """Rows done with a field ride along (masked, no draw) until a quarter of the batch is done, and the
    cache grows in place: the same sampled and greedy texts as parking every row the step it finishes with
    a cache that copies itself every step (the earlier filler), on 20 prompts in one batch of 24 (rows end
    fields at many different steps, so rows ride and park in groups)."""
    from fedkt.generate_cache import GrowingLayer

    tok = make_tokenizer()
    model = biased_model(tok, newline=1.5)
    prompts = [p + " " * (i % 3) for i in range(4) for p in PROMPTS]  # 20 prompts of several lengths
    kw = dict(n_choices=4, question_tokens=12, choice_tokens=6, batch_size=24, temperature=0.9, top_p=0.95,
              seed_for=lambda tag: derive_seed(3, tag))
    parks, grown = [], []
    orig_take, orig_rebuffer = template_fill._take, GrowingLayer._rebuffer
    monkeypatch.setattr(template_fill, "_take", lambda c, a, p, idx, ids: parks.append(len(idx)) or
                        orig_take(c, a, p, idx, ids))
    monkeypatch.setattr(GrowingLayer, "_rebuffer", lambda self, need: grown.append(need) or orig_rebuffer(self, need))
    st = FillStats()
    riding = fill_mc_template_cached(model, tok, prompts, **kw, stats=st)
    greedy = fill_mc_template_cached(model, tok, prompts, **{**kw, "temperature": 0.0})
    steps = st.forward_calls - st.prefill_calls
    assert max(parks) > 1 and len(parks) < sum(len(f) for f in st.field_tokens)  # parked in groups
    assert 0 < len(grown) < steps * 2  # two layers: buffers re-made at parks and boundaries, not every step
    riding_parks = len(parks)
    parks.clear()
    monkeypatch.setattr(template_fill, "RIDE_FRACTION", 10 ** 9)  # park every row the step it finishes
    monkeypatch.setattr(template_fill, "grow", lambda cache: None)  # the cache copies itself every step
    st_once = FillStats()
    assert fill_mc_template_cached(model, tok, prompts, **kw, stats=st_once) == riding
    assert fill_mc_template_cached(model, tok, prompts, **{**kw, "temperature": 0.0}) == greedy
    assert st_once.field_tokens == st.field_tokens and st_once.new_tokens == st.new_tokens
    assert st_once.forward_calls == st.forward_calls  # the same steps: a field lasts as long as its slowest row
    assert len(parks) > riding_parks  # a park (cache copy) per finishing step instead of per group


@torch.no_grad()
def test_a_prefix_all_prompts_share_is_computed_once():
    """Prompts that start alike (a system turn and instruction before the shots) share one prefix
    computation: the same greedy texts as the row-by-row reference in batches of 1, 3 and 8, the prefix's
    tokens fed once for the call."""
    tok = make_tokenizer()
    model = biased_model(tok)
    head = "You are an exam writer. Here are example questions from a science test, write one more:\n"
    prompts = [head + p for p in PROMPTS] + [head + "Question:"]
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    plen = len(head_ids := tok(head, add_special_tokens=False)["input_ids"])
    assert all(r[:plen] == head_ids for r in ids) and plen >= G.MIN_SHARED_PREFIX
    ref, _ = reference(model, tok, prompts, [None] * 6, 3, 10, 5)
    for bs in (1, 3, 8):
        st = FillStats()
        got = fill_mc_template_cached(model, tok, prompts, None, n_choices=3, question_tokens=10, choice_tokens=5,
                                      batch_size=bs, temperature=0.0, stats=st)
        assert got == ref, bs
        assert st.shared_prefix_tokens >= plen
        assert st.input_tokens <= sum(len(r) for r in ids) - 5 * st.shared_prefix_tokens + st.new_tokens + 6 * 4 * 4
