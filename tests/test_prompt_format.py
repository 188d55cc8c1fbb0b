"""eval.format: the "harness" and "cloze" prompt formats, their config, and that training and scoring read them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedkt.config import ConfigError, EvalConfig
from fedkt.data.prompts import choices, context, continuations, template, training_text, with_format
from fedkt.data.tasks import Example
from fedkt.evaluate import choice_loglikelihoods, score_multiple_choice
from fedkt.registry import load_config
from fedkt.train import tokenize_examples

CSQA = Example("commonsense_qa", "c1", "Where do you keep milk cold?", ("fridge", "oven", "car park", "bed", "sky"), 0)
ARC = Example("arc_easy", "a1", "Which gas do plants take in?", ("oxygen", "carbon dioxide", "helium"), 1)
OBQA = Example("openbookqa", "o1", "The sun is responsible for", ("puppies learning new tricks",
                                                                 "plants sprouting, blooming and wilting"), 1)
GSM = Example("gsm8k", "g1", "Tom has 2 apples and buys 3. How many?", target="2 + 3 = 5. The answer is 5.",
              label="5")


def fmt(ex: Example, f) -> Example:
    return with_format([ex], EvalConfig(format=f))[0]


# ------------------------------------------------------------------------------------------- the strings
def test_commonsense_qa_harness_is_lettered_and_cloze_scores_the_choice_texts():
    h, c = fmt(CSQA, "harness"), fmt(CSQA, "cloze")
    assert (h.format, c.format) == ("harness", "cloze")
    assert context(h) == ("Question: Where do you keep milk cold?\nA. fridge\nB. oven\nC. car park\nD. bed\nE. sky"
                          "\nAnswer:")
    assert continuations(h) == [" A", " B", " C", " D", " E"]
    assert choices(h) == ("A", "B", "C", "D", "E")
    assert context(c) == "Question: Where do you keep milk cold?\nAnswer:"
    assert continuations(c) == [" fridge", " oven", " car park", " bed", " sky"]
    assert choices(c) == ("fridge", "oven", "car park", "bed", "sky")  # acc_norm divides by these lengths
    assert training_text(h) == (context(h), " A")
    assert training_text(c) == ("Question: Where do you keep milk cold?\nAnswer:", " fridge")


@pytest.mark.parametrize("ex, ctx, conts", [
    (ARC, "Question: Which gas do plants take in?\nAnswer:", [" oxygen", " carbon dioxide", " helium"]),
    (OBQA, "The sun is responsible for", [" puppies learning new tricks", " plants sprouting, blooming and wilting"]),
])
def test_arc_and_openbookqa_read_the_same_in_both_formats(ex, ctx, conts):
    for f in ("harness", "cloze"):
        e = fmt(ex, f)
        assert e.format == f
        assert (context(e), continuations(e)) == (ctx, conts)
        assert training_text(e) == (ctx, conts[ex.answer])


def test_generation_examples_keep_their_one_format():
    g = fmt(GSM, "cloze")  # a single value leaves generation tasks alone (documented no-op)
    assert g is GSM and g.format == "harness"
    assert training_text(g) == ("Question: Tom has 2 apples and buys 3. How many?\nAnswer:",
                                " 2 + 3 = 5. The answer is 5.")
    assert EvalConfig(format="cloze").format_of("gsm8k") == "harness"


def test_a_table_sets_the_format_per_task_and_leaves_the_others_harness():
    cfg = EvalConfig(format={"commonsense_qa": "cloze"})
    out = with_format([CSQA, ARC, GSM], cfg)
    assert [e.format for e in out] == ["cloze", "harness", "harness"]
    assert out[1] is ARC  # unchanged examples are not copied
    assert [cfg.format_of(t) for t in ("commonsense_qa", "openbookqa", "custom")] == ["cloze", "harness", "harness"]
    assert EvalConfig(format="cloze").format_of("custom") == "cloze"


def test_an_unknown_format_on_an_example_is_an_error_naming_it():
    bad = Example("commonsense_qa", "c9", "q?", ("a", "b"), 0, format="lettered")
    with pytest.raises(ValueError, match=r"example c9 of task commonsense_qa: prompt format 'lettered' is not one "
                                         r"of 'harness', 'cloze' \(set it with eval.format\)"):
        template(bad)


# ------------------------------------------------------------------------------------------------ config
def test_config_takes_one_format_or_a_table():
    assert load_config(None, []).eval.format == "harness"
    assert load_config(None, ["eval.format=cloze"]).eval.format == "cloze"
    cfg = load_config(None, ['eval.format={commonsense_qa = "cloze", openbookqa = "harness"}'])
    assert cfg.eval.format == {"commonsense_qa": "cloze", "openbookqa": "harness"}
    assert load_config(None, ["eval.format.commonsense_qa=cloze"]).eval.format == {"commonsense_qa": "cloze"}


def test_config_roundtrips_through_toml(tmp_path):
    from fedkt.config import dump_toml

    cfg = load_config(None, ['eval.format={commonsense_qa = "cloze"}'])
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path, []).eval.format == {"commonsense_qa": "cloze"}


@pytest.mark.parametrize("override, message", [
    ("eval.format=clozee", "eval.format = 'clozee' is not allowed; allowed values: 'harness', 'cloze'; or a table "
                           "of such values, eval.format = {NAME = VALUE, ...}"),
    ('eval.format={commonsense_qa = "letters"}',
     "eval.format.commonsense_qa = 'letters' is not allowed; allowed values: 'harness', 'cloze'"),
    ('eval.format={hellaswag = "cloze"}',
     "eval.format.hellaswag: 'hellaswag' is not a task; allowed keys: arc_easy, arc_challenge, openbookqa, "
     "commonsense_qa, gsm8k"),
    ('eval.format={gsm8k = "cloze"}',
     "eval.format.gsm8k = 'cloze': gsm8k is a generation task with no choices to score in a cloze; remove it "
     "from the table (generation prompts have one format)"),
    ("eval.format=3", "eval.format = 3 is not allowed; allowed values: 'harness', 'cloze'; or a table"),
])
def test_config_errors_name_the_key_and_the_allowed_values(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message)


def test_evalconfig_built_in_code_is_checked_too():
    with pytest.raises(ConfigError, match=r"format = 'Cloze' is not allowed; allowed values: 'harness', 'cloze'"):
        EvalConfig(format="Cloze")
    assert EvalConfig(format={"gsm8k": "harness"}).format_of("gsm8k") == "harness"


# ------------------------------------------------------------------------------------------ data loading
def _write_csqa(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, (q, ch, key) in enumerate(rows):
            f.write(json.dumps({"id": f"cs{i}", "question": q, "question_concept": "x",
                                "choices": {"label": list("ABCDE")[:len(ch)], "text": ch}, "answerKey": key}) + "\n")
    return path


CSQA_ROWS = [(f"Where is thing {i}?", ["home", "work", "park", "shop", "road"], "ABCDE"[i % 5]) for i in range(40)]


def test_the_experiment_loads_training_aux_and_eval_data_in_the_configured_format(tmp_path):
    from fedkt.simulation import load_client_data, load_eval_sets

    d = tmp_path / "data"
    _write_csqa(d / "commonsense_qa" / "train.jsonl", CSQA_ROWS)
    _write_csqa(d / "commonsense_qa" / "test.jsonl", CSQA_ROWS[:10])
    base = [f"data.dir={d}", 'data.tasks=["commonsense_qa"]', "partition.num_clients=2", "partition.aux_size=8"]
    for f, ctx, cont in (("harness", "Question: Where is thing 0?\nA. home\nB. work\nC. park\nD. shop\nE. road\n"
                                     "Answer:", " A"),
                         ("cloze", "Question: Where is thing 0?\nAnswer:", " home")):
        cfg = load_config(None, base + [f"eval.format={f}"])
        clients, aux = load_client_data(cfg)
        evals = load_eval_sets(cfg)
        every = [e for c in clients for e in c] + aux + evals["commonsense_qa"]
        assert len(every) == 40 + 10 and {e.format for e in every} == {f}
        first = next(e for e in evals["commonsense_qa"] if e.id == "cs0")
        assert training_text(first) == (ctx, cont)


def test_a_deployed_client_reads_its_own_files_in_the_format_its_spec_names(tmp_path, model_dirs):
    from fedkt.clients import ClientFactory, ClientSpec

    f = _write_csqa(tmp_path / "mine.jsonl", CSQA_ROWS[:3])
    evals = {"commonsense_qa": [Example("commonsense_qa", "e0", "Where?", ("a", "b"), 1)]}
    spec = ClientSpec(cid="c0", model=str(model_dirs["slm"]), eval=EvalConfig(format={"commonsense_qa": "cloze"}),
                      data_files=[str(f)], data_task="commonsense_qa", eval_sets=evals)
    ctx = ClientFactory().build(spec)
    assert [e.format for e in ctx.data] == ["cloze"] * 3
    assert [e.format for e in ctx.eval_sets["commonsense_qa"]] == ["cloze"]
    assert training_text(ctx.data[1]) == ("Question: Where is thing 1?\nAnswer:", " work")


# ----------------------------------------------------------------------------------- training and scoring
def word_tokenizer(words):
    """A word-level tokenizer (one token per whitespace-separated word or punctuation mark), so that the
    token counts below are known by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


WORDS = ["Question", ":", "Where", "do", "you", "keep", "milk", "cold", "?", "Answer", ".", "A", "B", "C", "D", "E",
         "fridge", "oven", "car", "park", "bed", "sky"]


class Unigram(torch.nn.Module):
    """A 'language model' whose next-token logits are the same vector ``bias`` at every position: the
    log-probability of a continuation is the sum of ``log_softmax(bias)`` over its tokens."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.head = torch.nn.Linear(1, len(bias), bias=False)
        with torch.no_grad():
            self.head.weight.copy_(bias[:, None])
        self.config = type("Cfg", (), {"_attn_implementation": "eager"})()

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, **_):
        hidden = torch.ones(*input_ids.shape, 1)
        return type("Out", (), {"logits": self.head(hidden)})()


def test_training_examples_supervise_the_letter_or_the_answer_text():
    tok = word_tokenizer(WORDS)
    names = lambda ids: tok.convert_ids_to_tokens([i for i in ids if i != -100])  # noqa: E731
    h, c = tokenize_examples(tok, [fmt(CSQA, "harness"), fmt(CSQA, "cloze")], max_length=64)
    assert names(h.labels) == ["A", "</s>"]
    assert names(c.labels) == ["fridge", "</s>"]
    assert tok.convert_ids_to_tokens(c.input_ids) == ["Question", ":", "Where", "do", "you", "keep", "milk", "cold",
                                                      "?", "Answer", ":", "fridge", "</s>"]
    # the lettered list adds "X . text" per choice (car park: 2 words): 11 + 16 context tokens, "A", EOS
    assert len(h.input_ids) == 11 + 16 + 2 and names(h.input_ids[-2:]) == ["A", "</s>"]


def test_scoring_a_planted_case_gives_the_hand_computed_answer_in_each_format():
    tok = word_tokenizer(WORDS)
    ids = {w: tok.convert_tokens_to_ids(w) for w in WORDS}
    bias = torch.zeros(len(tok))
    bias[ids["C"]], bias[ids["oven"]], bias[ids["car"]], bias[ids["park"]] = 2.0, 1.0, 1.5, 1.5
    model = Unigram(bias)
    V = len(tok)  # 25 tokens: 21 at logit 0, four planted
    log_z = math.log((V - 4) + math.exp(2.0) + math.exp(1.0) + 2 * math.exp(1.5))

    # harness: one token per letter, the planted "C" wins acc and acc_norm (letters are 1 character)
    h = fmt(CSQA, "harness")
    (lls,) = choice_loglikelihoods(model, tok, [h])
    assert lls == pytest.approx([-log_z, -log_z, 2.0 - log_z, -log_z, -log_z], abs=1e-5)
    planted_c = Example(**{**h.__dict__, "answer": 2})
    assert score_multiple_choice(model, tok, [planted_c]) == {"acc": 1.0, "acc_norm": 1.0, "n": 1}

    # cloze: "oven" (1 token, +1) has the best sum; "car park" (2 tokens, +1.5 each) the best per character
    c = fmt(CSQA, "cloze")
    (lls,) = choice_loglikelihoods(model, tok, [c])
    want = [-log_z, 1.0 - log_z, 3.0 - 2 * log_z, -log_z, -log_z]
    assert lls == pytest.approx(want, abs=1e-5)
    per_char = [w / n for w, n in zip(want, (6, 4, 8, 3, 3))]
    assert max(range(5), key=lambda j: want[j]) == 1 and max(range(5), key=lambda j: per_char[j]) == 2
    oven = Example(**{**c.__dict__, "answer": 1})
    car_park = Example(**{**c.__dict__, "answer": 2})
    assert score_multiple_choice(model, tok, [oven]) == {"acc": 1.0, "acc_norm": 0.0, "n": 1}
    assert score_multiple_choice(model, tok, [car_park]) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


def test_a_flower_client_spec_carries_the_format_table_and_the_examples_formats():
    from fedkt.clients import ClientSpec
    from fedkt.federation.flower_spec import spec_from_json, spec_to_json

    ex = fmt(CSQA, {"commonsense_qa": "cloze"})
    spec = ClientSpec(cid="c0", model="m", eval=EvalConfig(format={"commonsense_qa": "cloze"}), examples=[ex],
                      eval_sets={"commonsense_qa": [ex]})
    back = spec_from_json(spec_to_json(spec))
    assert back.eval.format == {"commonsense_qa": "cloze"}
    assert back.examples == [ex] and back.examples[0].format == "cloze"
    assert context(back.eval_sets["commonsense_qa"][0]) == "Question: Where do you keep milk cold?\nAnswer:"


def test_examples_a_client_trains_on_take_its_format_even_when_rebuilt_from_text(tmp_path, model_dirs, monkeypatch):
    """FDKT's synthetic examples reach a client as text and are parsed back with the harness default:
    train_and_evaluate_locally (standalone, FDKT) trains them in the client's eval.format."""
    from fedkt.algorithms import baselines
    from fedkt.clients import ClientFactory, ClientSpec

    seen = []
    monkeypatch.setattr(baselines, "sft", lambda model, tok, data, *a, **k: seen.extend(data) or
                        type("S", (), {"mean_loss": 0.0})())
    monkeypatch.setattr(baselines, "evaluate_tasks", lambda *a, **k: {})
    spec = ClientSpec(cid="c0", model=str(model_dirs["slm"]), eval=EvalConfig(format="cloze"), examples=[])
    ctx = ClientFactory().build(spec)
    synthetic = [CSQA, ARC]  # as parsed: format "harness"
    baselines.train_and_evaluate_locally(ctx, synthetic, 1.0, "fdkt")
    assert [e.format for e in seen] == ["cloze", "cloze"]
    assert training_text(seen[0]) == ("Question: Where do you keep milk cold?\nAnswer:", " fridge")
