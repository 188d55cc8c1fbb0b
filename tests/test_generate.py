"""Batched early-stopping generation: equals one-at-a-time generation, stops early, samples reproducibly."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from fedkt.generate import (_sample, chat_prompt, cut_at_stop, eos_token_ids, generate, generate_ex,
                            render_plain)

PROMPTS = ["Question: Which planet", "The answer is", "oxygen nitrogen helium hydrogen water rock sand", "A",
           "Question: What force pulls objects toward Earth?\nAnswer:", "rain snow", "Mercury", "42. Natalia sold"]
N_NEW = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster when the 2 cores are busy with other work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(tok):
    """An untied tiny Llama with a wide init: its greedy text varies (a tied one repeats the last token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, initializer_range=0.3, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(cfg).eval()


def one_at_a_time(model, tok, prompt: str, eos: list[int], n: int = N_NEW) -> list[int]:
    """Reference: transformers' own greedy generate on the prompt alone (no padding)."""
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                         temperature=None, top_p=None, top_k=None)
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    for i, t in enumerate(ids):  # transformers pads after EOS; cut there, EOS included
        if t in eos:
            return ids[:i + 1]
    return ids


@pytest.fixture(scope="module")
def free_run(model, tok):
    """Greedy continuations by transformers, one prompt at a time, ending at </s> or after N_NEW tokens."""
    return [one_at_a_time(model, tok, p, [tok.eos_token_id]) for p in PROMPTS]


def test_prompts_differ_in_length(tok):
    lens = {len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS}
    assert len(lens) >= 5  # left padding really happens


@pytest.mark.parametrize("bs", [1, 3, 8])
def test_batched_greedy_equals_one_at_a_time(model, tok, free_run, bs):
    g = generate_ex(model, tok, PROMPTS, max_new_tokens=N_NEW, batch_size=bs)
    assert g.token_ids == free_run
    assert g.new_tokens == [len(r) for r in free_run]
    assert g.texts == [tok.decode(r, skip_special_tokens=True) for r in free_run]
    assert generate(model, tok, PROMPTS, max_new_tokens=N_NEW, batch_size=bs) == g.texts


def _eos_candidate(free_run) -> int:
    """A token that rows first emit at different steps (and some rows never): rows finish at different times."""
    best, best_key = None, None
    for t in {x for r in free_run for x in r}:
        firsts = [r.index(t) for r in free_run if t in r]
        key = (len(set(firsts)), len(firsts) < len(free_run))
        if key[1] and (best_key is None or key > best_key):
            best, best_key = t, key
    return best


@contextlib.contextmanager
def second_eos(model, tok, free_run):
    """The model's generation config gets a second EOS id (as chat models have: <|im_end|>, <|endoftext|>), a
    token the rows first emit at different steps (``_eos_candidate``), restored afterwards; yields the ids."""
    eos = [tok.eos_token_id, _eos_candidate(free_run)]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        yield eos
    finally:
        model.generation_config.eos_token_id = old


def test_eos_at_different_steps_per_row(model, tok, free_run):
    with second_eos(model, tok, free_run) as eos:
        refs = [one_at_a_time(model, tok, p, eos) for p in PROMPTS]
        lengths = [len(r) for r in refs]
        assert len(set(lengths)) >= 3 and N_NEW in lengths  # rows stop at several steps, one never stops
        assert eos_token_ids(model, tok) == sorted(eos)
        for bs in (1, 3, 8):
            g = generate_ex(model, tok, PROMPTS, max_new_tokens=N_NEW, batch_size=bs)
            assert g.token_ids == refs, bs
            assert g.new_tokens == lengths


def _stop_candidate(tok, texts: list[str]) -> str:
    """A 2-character string found in several rows' texts at different offsets, absent from at least one."""
    best, best_key = None, None
    for t in texts:
        for i in range(len(t) - 1):
            s = t[i:i + 2]
            if "\ufffd" in s:
                continue
            offs = [u.find(s) for u in texts if s in u]
            key = (len(set(offs)), -len(offs))
            if len(offs) < len(texts) and (best_key is None or key > best_key):
                best, best_key = s, key
    return best


def test_stop_strings_cut_text_and_stop_each_row(model, tok, free_run):
    full_texts = [tok.decode(r, skip_special_tokens=True) for r in free_run]
    stop = _stop_candidate(tok, full_texts)
    expected = [cut_at_stop(t, [stop]) for t in full_texts]
    assert len({len(e) for e in expected}) >= 3 and any(stop not in t for t in full_texts)
    for bs in (1, 3, 8):
        g = generate_ex(model, tok, PROMPTS, max_new_tokens=N_NEW, batch_size=bs, stop=[stop])
        assert g.texts == expected
        for ids, ref, t in zip(g.token_ids, free_run, full_texts):
            assert ids == ref[:len(ids)]  # same tokens as free-running, cut at the step the stop string appears
            if stop in t:  # the row stopped at the first step whose text holds the stop string
                k = len(ids)
                assert stop in tok.decode(ids, skip_special_tokens=True)
                assert stop not in tok.decode(ids[:k - 1], skip_special_tokens=True)
            else:
                assert len(ids) == len(ref)


class CountingForward:
    """Wraps a model's forward; records the batch rows and input width of every call."""

    def __init__(self, model):
        self.model, self.inner, self.rows, self.widths = model, model.forward, [], []

    def __enter__(self):
        def forward(*a, **k):
            self.rows.append(int(k["input_ids"].shape[0]))
            self.widths.append(int(k["input_ids"].shape[1]))
            return self.inner(*a, **k)

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


def test_generation_stops_early_and_drops_finished_rows(model, tok, free_run):
    from fedkt.generate import _prefill_groups

    limit = 200
    lengths = sorted((len(r) for r in tok(PROMPTS[:4], add_special_tokens=False)["input_ids"]), reverse=True)
    with second_eos(model, tok, free_run):
        for refill, groups in ((False, 1), (True, len(_prefill_groups(lengths)))):
            with CountingForward(model) as c:
                g = generate_ex(model, tok, PROMPTS[:4], max_new_tokens=limit, batch_size=4, refill=refill)
            assert max(g.new_tokens) < limit and len(set(g.new_tokens)) >= 3  # all rows hit an EOS, at different steps
            # the prefill(s) + one forward per further step of the longest row, not `limit` forwards
            assert len(c.rows) == g.forward_calls == groups + max(g.new_tokens) - 1
            # a row that made n tokens took part in exactly n forwards (prefill + n-1 steps): finished rows leave
            assert sum(c.rows) == sum(g.new_tokens) < len(g.new_tokens) * max(g.new_tokens)
            assert sum(c.rows[:groups]) == 4 and c.rows[groups] == 4 and c.rows[-1] == 1
    assert groups == 2  # these 4 prompts (2 to 11 tokens) are prefilled in two length groups


def test_stop_string_ends_the_loop(model, tok, free_run):
    text = tok.decode(free_run[0], skip_special_tokens=True)
    stop = text[3:5]
    with CountingForward(model) as c:
        g = generate_ex(model, tok, PROMPTS[:1], max_new_tokens=100, stop=[stop])
    assert g.texts == [cut_at_stop(text, [stop])]
    assert len(c.rows) == g.new_tokens[0] < 10


def test_sampling_is_reproducible_by_seed(model, tok):
    kw = dict(max_new_tokens=16, batch_size=3, do_sample=True, temperature=1.0, top_p=0.95, top_k=50)
    rng = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    torch.manual_seed(123)  # and does not matter
    assert generate(model, tok, PROMPTS, seed=7, **kw) == a
    b = generate(model, tok, PROMPTS, seed=8, **kw)
    assert b != a
    greedy = generate(model, tok, PROMPTS, max_new_tokens=16)
    assert a != greedy
    # top_k=1 sampling is greedy decoding
    assert generate(model, tok, PROMPTS, max_new_tokens=16, do_sample=True, top_k=1, seed=3) == greedy


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = _sample(logits, 1.0, 0, 0.7, gen)  # nucleus: 0.5 < 0.7, 0.5 + 0.3 >= 0.7 -> {0, 1}
    counts = torch.bincount(draws, minlength=4)
    assert counts[2] == counts[3] == 0
    p0 = counts[0].item() / 4000  # renormalised: 0.5 / 0.8 = 0.625, sd = sqrt(.625*.375/4000) = 0.0077
    assert abs(p0 - 0.625) < 0.03
    draws = _sample(logits, 1.0, 3, 1.0, gen)  # top-k 3: {0, 1, 2} with 0.5/0.95 for token 0
    counts = torch.bincount(draws, minlength=4)
    assert counts[3] == 0 and abs(counts[0].item() / 4000 - 0.5 / 0.95) < 0.03


def test_empty_prompt_list_and_bad_arguments(model, tok):
    assert generate(model, tok, []) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, ["a"], max_new_tokens=0)


def test_chat_prompt_plain_and_template(tok):
    few = [("What is 2+2?", "4")]
    assert chat_prompt(tok, "Be brief.", "What is 3+3?", few) == (
        "Be brief.\n\nUser: What is 2+2?\nAssistant: 4\nUser: What is 3+3?\nAssistant:")
    assert render_plain([{"role": "user", "content": "hi"}]) == "User: hi\nAssistant:"
    t = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    t.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                       "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert chat_prompt(t, "Be brief.", "What is 3+3?", few) == (
        "<system>Be brief.</s><user>What is 2+2?</s><assistant>4</s><user>What is 3+3?</s><assistant>")
    # a template that rejects the system role: the system text is folded into the first user turn
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                       "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
    assert chat_prompt(t, "Be brief.", "Hi") == "<user>Be brief.\n\nHi<assistant>"


def test_shared_prefix_is_computed_once_and_changes_nothing(model, tok):
    from fedkt.generate import MIN_SHARED_PREFIX

    head = "Question: Which gas do plants take in for photosynthesis?\nAnswer: carbon dioxide\n"
    prompts = [head + p for p in PROMPTS]
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    plen = len(os.path.commonprefix(ids))
    assert plen >= MIN_SHARED_PREFIX and len({len(r) - plen for r in ids}) >= 5  # suffixes of different lengths
    refs = [one_at_a_time(model, tok, p, [tok.eos_token_id]) for p in prompts]
    for bs in (1, 3, 8):
        with CountingForward(model) as c:
            g = generate_ex(model, tok, prompts, max_new_tokens=N_NEW, batch_size=bs)
        assert g.token_ids == refs, bs
        assert g.shared_prefix_tokens == plen
        assert c.rows[0] == 1 and c.widths[0] == plen  # the prefix, once
        assert max(c.widths[1:]) == max(len(r) for r in ids) - plen  # later prefills only see suffixes


def test_continuous_batching_refills_finished_rows(model, tok, free_run):
    """With fewer slots than prompts, a finished row's slot goes to the next prompt of the queue while the
    others keep decoding (a prefill forward in the middle of the run): same tokens as one at a time, fewer
    forwards than fixed batches run to their last row."""
    with second_eos(model, tok, free_run) as eos:
        refs = [one_at_a_time(model, tok, p, eos) for p in PROMPTS]
        for bs in (2, 3, 4):
            with CountingForward(model) as c:
                g = generate_ex(model, tok, PROMPTS, max_new_tokens=N_NEW, batch_size=bs)
            assert g.token_ids == refs, bs
            prefills = [j for j, w in enumerate(c.widths) if w > 1]
            assert prefills[0] == 0 and len(prefills) >= 2
            assert max(c.rows) <= bs and sum(c.widths[j] > 1 for j in range(len(c.rows))) == len(prefills)
            # a prefill joined a running batch: the forward after it carries more rows than the prefill had
            assert any(c.rows[j + 1] > c.rows[j] for j in prefills[1:] if j + 1 < len(c.rows)), bs
            static = generate_ex(model, tok, PROMPTS, max_new_tokens=N_NEW, batch_size=bs, refill=False)
            assert static.token_ids == refs
            assert g.forward_calls - len(prefills) < static.forward_calls - len(static.per_batch_steps)
            assert sum(g.per_batch_steps) < sum(static.per_batch_steps)


def test_sampling_keeps_fixed_batches(model, tok):
    """Sampled runs draw from one generator in batch order: by default they keep the fixed batches, so their
    outputs do not depend on when rows finish (and equal earlier fedkt versions' for a seed)."""
    kw = dict(max_new_tokens=16, batch_size=3, do_sample=True, temperature=1.0, top_p=0.95, seed=7)
    assert generate(model, tok, PROMPTS, **kw) == generate(model, tok, PROMPTS, refill=False, **kw)


def test_prefill_groups_minimise_padding_plus_calls():
    from fedkt.generate import _prefill_groups

    # cost = sum(call + rows x width): [10,9,8,2,1] with call 4 -> {10,9,8} 30+4, {2,1} 4+4 = 42
    # (one group: 50+4 = 54; three groups {10,9,8},{2},{1}: 30+2+1+12 = 45)
    assert _prefill_groups([10, 9, 8, 2, 1], call_tokens=4) == [3, 2]
    assert _prefill_groups([10, 9, 8, 2, 1], call_tokens=100) == [5]  # calls dear: one group
    assert _prefill_groups([10, 9, 8, 2, 1], call_tokens=0) == [1, 1, 1, 1, 1]  # calls free: no padding
    assert _prefill_groups([5, 5, 5, 5], call_tokens=1) == [4]
    assert _prefill_groups([], call_tokens=4) == []


def test_growing_cache_writes_in_place_and_changes_nothing(model, tok):
    """The decode loop's KV cache grows into spare columns (no copy of the whole cache per step) and gives
    the same keys/values, logits and texts as transformers' own concatenating cache."""
    from transformers import DynamicCache

    from fedkt.generate_cache import GROW_COLUMNS, GrowingLayer, grow

    ids = tok(PROMPTS[4], return_tensors="pt", add_special_tokens=False)["input_ids"]
    n = ids.shape[1]
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=True).past_key_values
        grown = model(input_ids=ids, use_cache=True).past_key_values
        grow(grown)
        assert all(type(layer) is GrowingLayer for layer in grown.layers)
        ptrs = set()
        for step in range(5):
            nxt = torch.tensor([[7 + step]])
            a = model(input_ids=nxt, past_key_values=plain, use_cache=True).logits
            b = model(input_ids=nxt, past_key_values=grown, use_cache=True).logits
            assert torch.equal(a, b)
            ptrs.add(grown.layers[0].keys.data_ptr())
            assert grown.layers[0].keys.shape[-2] == n + step + 1
        for lp, lg in zip(plain.layers, grown.layers):
            assert torch.equal(lp.keys, lg.keys) and torch.equal(lp.values, lg.values)
            assert lg._kbuf.shape[-2] == n + 1 + GROW_COLUMNS  # one buffer since the first step
        assert len(ptrs) == 1  # every step wrote into the same buffer
    assert isinstance(plain, DynamicCache)


def test_compacting_a_growing_cache_copies_once_and_changes_nothing(model, tok, monkeypatch):
    """``compact`` on growing layers takes the kept rows' buffers (spare columns included) in one copy, so
    the next step writes in place (no re-buffering); keys/values and logits equal a plain cache compacted
    the same way (rows 0 and 2 of 3, two leading columns no kept row attends to cut)."""
    from fedkt.generate_cache import GrowingLayer, compact, grow

    ids = tok([PROMPTS[4]] * 3, return_tensors="pt", add_special_tokens=False)["input_ids"]
    attn = torch.ones_like(ids)
    attn[[0, 2], :2] = 0  # the kept rows do not attend to the first two columns
    keep = torch.tensor([0, 2])
    rebuffers = []
    orig = GrowingLayer._rebuffer
    monkeypatch.setattr(GrowingLayer, "_rebuffer", lambda self, need: rebuffers.append(need) or orig(self, need))
    with torch.no_grad():
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        plain = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True).past_key_values
        grown = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True).past_key_values
        grow(grown)
        nxt = torch.tensor([[7], [8], [9]])
        a2 = torch.cat([attn, torch.ones((3, 1), dtype=torch.long)], 1)
        p2 = pos[:, -1:] + 1
        model(input_ids=nxt, attention_mask=a2, position_ids=p2, past_key_values=plain, use_cache=True)
        model(input_ids=nxt, attention_mask=a2, position_ids=p2, past_key_values=grown, use_cache=True)
        assert len(rebuffers) == len(grown.layers)  # the first step made the buffers
        m_plain = compact(plain, a2, keep, trim=True)
        m_grown = compact(grown, a2, keep, trim=True)
        assert torch.equal(m_plain, m_grown) and m_grown.shape == (2, ids.shape[1] - 1)
        for step in range(3):
            nxt = torch.tensor([[11 + step], [12 + step]])
            m_plain = torch.cat([m_plain, torch.ones((2, 1), dtype=torch.long)], 1)
            m_grown = torch.cat([m_grown, torch.ones((2, 1), dtype=torch.long)], 1)
            p3 = p2[keep] + 1 + step
            a = model(input_ids=nxt, attention_mask=m_plain, position_ids=p3, past_key_values=plain, use_cache=True)
            b = model(input_ids=nxt, attention_mask=m_grown, position_ids=p3, past_key_values=grown, use_cache=True)
            assert torch.equal(a.logits, b.logits)
        for lp, lg in zip(plain.layers, grown.layers):
            assert torch.equal(lp.keys, lg.keys) and torch.equal(lp.values, lg.values)
        assert len(rebuffers) == len(grown.layers)  # no copy after the compaction: the steps wrote in place


def test_done_rows_leave_in_bulk_with_refill(model, tok, free_run):
    """With refill, a finished row rides along (its output ignored, its position frozen) until a quarter of the
    batch is done: fewer cache compactions, the same tokens. Fixed batches drop every finished row at once."""
    with second_eos(model, tok, free_run) as eos:
        refs = [one_at_a_time(model, tok, p, eos) for p in PROMPTS]
        rows = {}
        for refill in (False, True):
            with CountingForward(model) as c:
                g = generate_ex(model, tok, PROMPTS, max_new_tokens=N_NEW, batch_size=8, refill=refill)
            assert g.token_ids == refs, refill
            rows[refill] = sum(c.rows)
        made = sum(len(r) for r in refs)
        assert rows[False] == made  # each row in exactly as many forwards as it made tokens
        assert rows[True] > made  # some done rows rode along in later steps


def test_sliding_window_cache_cannot_merge_and_still_matches(tok):
    """A sliding-window model's cache layers cannot be padded and merged: no refill, no growth, no length
    groups after the first batch; batched tokens still equal transformers' one at a time."""
    from transformers import MistralConfig, MistralForCausalLM

    from fedkt.generate_cache import mergeable

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=6, initializer_range=0.3,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                        tie_word_embeddings=False)
    m = MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        assert not mergeable(m(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values)
    refs = [one_at_a_time(m, tok, p, [tok.eos_token_id]) for p in PROMPTS]
    assert max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS) + N_NEW > 6  # the window slides
    for bs in (1, 3, 8):
        assert generate_ex(m, tok, PROMPTS, max_new_tokens=N_NEW, batch_size=bs).token_ids == refs, bs
