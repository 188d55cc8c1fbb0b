"""FedCoT as the paper runs it (issue 22 §3): the public frame passes unperturbed and uncharged, the
adaptive mechanism's accounting, the paper's decode prompt, one input for both tasks, truncated
rationales without EOS. Hand-computed numbers; the conftest tokenizer's pieces are listed where counted."""

import math

import pytest
import torch

from fedkt.algorithms.fedcot import FedCoTConfig, collate_multitask, finished, multitask_data, multitask_loss
from fedkt.algorithms.fedcot_prompts import (decode_prompt, label_pair, question_segments, rationale_pair,
                                             render_question, teacher_user_message)
from fedkt.config import ConfigError, LoraSettings
from fedkt.data.collate import IGNORE, collate_sft
from fedkt.data.tasks import Example
from fedkt.generate import Generation
from fedkt.losses import answer_ce
from fedkt.models import add_lora, load_model
from fedkt.privacy.text_dp import EmbeddingKit, sample_replacements
from fedkt.privacy.text_dp_frame import perturb_framed, token_epsilons
from fedkt.registry import load_config

Q, CH = "Which gas do plants use?", ("oxygen", "carbon dioxide")
# conftest tokenizer pieces (segment by segment, the same as the whole prompt's tokenisation):
#   public  'Question:' -> Question, :                                   2
#   private ' Which gas do plants use?' -> ĠWh ic h Ġ g a s Ġd o Ġp l an t s Ġ u s e ?   19
#   public  '\nChoices:' -> Ċ C h o ic es :                              7
#   public  ' (A)' -> Ġ ( A )  and ' (B)' -> Ġ ( B )                      4 + 4
#   private ' oxygen' -> Ġo x y gen                                       4
#   private ' carbon dioxide' -> Ġc ar bo n Ġd io x i d e                 10
N_PRIVATE, N_PUBLIC = 19 + 4 + 10, 2 + 7 + 4 + 4


def ex(task="arc_easy"):
    return Example(task=task, id="0", question=Q, choices=CH, answer=1, target="carbon dioxide")


@pytest.fixture(scope="module")
def kit(tok):
    emb = torch.randn(len(tok), 32, generator=torch.Generator().manual_seed(1))
    return EmbeddingKit.build(emb, tok, n_neighbors=8)


def test_frame_segments_render_the_old_prompt():
    assert question_segments(Q, CH) == [("Question:", False), (" " + Q, True), ("\nChoices:", False),
                                        (" (A)", False), (" oxygen", True), (" (B)", False), (" carbon dioxide", True)]
    assert render_question(ex()) == "Question: Which gas do plants use?\nChoices: (A) oxygen (B) carbon dioxide"


def test_template_tokens_survive_and_only_private_tokens_are_charged(tok, kit):
    segs = question_segments(Q, CH)
    for eps in (0.1, 3.0):
        res = perturb_framed([segs] * 4, kit, tok, eps, seed=5)
        for r in res:
            assert r.text.startswith("Question:")
            pos = 0
            for piece in ("Question:", "\nChoices:", " (A)", " (B)"):  # in order, verbatim
                pos = r.text.index(piece, pos) + len(piece)
            assert (r.n_tokens, r.n_public) == (N_PRIVATE, N_PUBLIC)
            assert r.epsilon_per_token == eps and r.epsilon_total == pytest.approx(33 * eps)
        assert sum(r.n_changed for r in res) > 0  # the private text did change
    assert all(Q not in r.text for r in perturb_framed([segs] * 4, kit, tok, 0.1, seed=5))
    inf = perturb_framed([segs], None, tok, math.inf, seed=0)[0]
    assert inf.text == render_question(ex()) and inf.n_changed == 0 and math.isinf(inf.epsilon_total)


def test_adaptive_mechanism_accounting_by_hand(tok, kit):
    one = question_segments(Q, CH[:1])  # 19 + 4 = 23 private tokens
    n = [N_PRIVATE, 23]
    assert token_epsilons(n, 3.0, "exponential") == [3.0, 3.0]
    # n̄ = (33 + 23) / 2 = 28; each prompt costs ε·n̄ = 84; per token 84/33 and 84/23
    e = token_epsilons(n, 3.0, "adaptive")
    assert e == pytest.approx([84 / 33, 84 / 23])
    res = perturb_framed([question_segments(Q, CH), one], kit, tok, 3.0, seed=1, mechanism="adaptive")
    assert [r.epsilon_total for r in res] == pytest.approx([84.0, 84.0])
    assert sum(r.epsilon_total for r in res) == pytest.approx(3.0 * (33 + 23))  # the same total as exponential
    ex_res = perturb_framed([question_segments(Q, CH), one], kit, tok, 3.0, seed=1)
    assert [r.epsilon_total for r in ex_res] == pytest.approx([99.0, 69.0])  # worst prompt 99 -> 84
    assert token_epsilons([0, 10], 2.0, "adaptive") == [2.0, 2.0]  # n̄ over prompts with private text
    with pytest.raises(ValueError, match="mechanism must be one of"):
        token_epsilons([1], 1.0, "laplace")


def test_per_token_epsilon_is_the_scalar_mechanism_position_by_position(kit):
    ids = torch.tensor([5, 17, 40, 41, 99, 120])
    eps = torch.tensor([0.5, 8.0, 0.5, 8.0, 0.5, 8.0], dtype=torch.float64)
    mixed = sample_replacements(ids, kit, eps, 11)
    lo, hi = sample_replacements(ids, kit, 0.5, 11), sample_replacements(ids, kit, 8.0, 11)
    assert torch.equal(mixed, torch.where(eps < 1, lo, hi))
    assert torch.equal(sample_replacements(ids, kit, torch.full((6,), 8.0, dtype=torch.float64), 11), hi)
    with pytest.raises(ValueError, match="finite and > 0"):
        sample_replacements(ids, kit, torch.full((6,), math.inf), 0)


def test_decode_prompt_is_the_papers():
    got = decode_prompt("Question: Whch gus do plonts use?\nChoices: (A) oxygon (B) carbin dioxode",
                        "Plants use carbon dioxide.\nSo (B).<end>", ex())
    assert got == (
        'Select the answer from the choices and explain it in "Rationale" with few words. Please refer to the '
        "example to write the rationale.\nUse <end> to finish your rationale.\n\n"
        "Example(s):\nQuestion: Which gas do plants take in from the air to make food?\n"
        "Choices: (A) oxygen (B) carbon dioxide (C) nitrogen (D) helium\n"
        "Rationale: Plants make food by photosynthesis, which takes in carbon dioxide from the air and gives off "
        "oxygen. So the answer is (B) carbon dioxide.<end>\n\n"
        "Question: Whch gus do plonts use?\nChoices: (A) oxygon (B) carbin dioxode\n"
        "Rationale: Plants use carbon dioxide. So (B).<end>\n\n"
        "Please explain:\nQuestion: Which gas do plants use?\nChoices: (A) oxygen (B) carbon dioxide\nRationale:")
    assert teacher_user_message("Question: x").endswith("<end>\n\nPlease explain:\nQuestion: x\nRationale:")


def test_one_input_for_both_tasks():
    for task, x in (("arc_easy", "Question: Which gas do plants use?\nAnswer:"), ("openbookqa", Q)):
        assert label_pair(ex(task)) == (x, " carbon dioxide")
        assert rationale_pair(ex(task), " Plants use it. ") == ("Explain:\n" + x, " Plants use it.")


def test_truncated_rationales_keep_unterminated_or_drop(model_dirs):
    model, tok = load_model(str(model_dirs["slm"]))
    model = add_lora(model, LoraSettings(r=4, dropout=0.0))
    exs, rats = [ex(), ex()], ["plants use carbon dioxide", "photosynthesis takes in carbon"]
    keep = multitask_data(tok, exs, rats, 128, ended=[True, False], truncated="keep_unterminated")
    drop = multitask_data(tok, exs, rats, 128, ended=[True, False], truncated="drop")
    sup = lambda e: [t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE]  # noqa: E731
    assert sup(keep[0][0])[-1] == tok.eos_token_id and tok.decode(sup(keep[0][0])[:-1]) == " plants use carbon dioxide"
    assert tok.decode(sup(keep[1][0])) == " photosynthesis takes in carbon"  # no EOS after a cut rationale
    assert tok.eos_token_id not in sup(keep[1][0])
    assert sup(drop[1][0]) == [] and drop[1][0].input_ids == keep[1][0].input_ids
    assert drop[1][1].labels == keep[1][1].labels  # the label task stays
    with torch.no_grad():
        def ce(items):
            b = collate_sft(items, tok.pad_token_id)
            return answer_ce(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]).item()

        a = 0.5
        assert multitask_loss(model, collate_multitask(drop, tok.pad_token_id), a).item() == pytest.approx(
            a * ce([drop[0][0]]) + (1 - a) * ce([p for _, p in drop]), rel=1e-6)
        assert multitask_loss(model, collate_multitask(drop[1:], tok.pad_token_id), a).item() == pytest.approx(
            (1 - a) * ce([drop[1][1]]), rel=1e-6)  # every rationale dropped: the label term alone


def test_finished_tells_a_cut_rationale_from_an_ended_one(tok):
    body = tok(" plants use it", add_special_tokens=False)["input_ids"]
    end = tok(" so B<end>", add_special_tokens=False)["input_ids"]
    g = Generation(["", "", "", ""], [0] * 4, [body + [tok.eos_token_id], body + end, body, []])
    assert finished(g, tok, [tok.eos_token_id], ["<end>", "\n\n"]) == [True, True, False, False]


def test_config_fields():
    cfg = load_config(None, []).section(FedCoTConfig)
    assert (cfg.mechanism, cfg.truncated, cfg.rationale_tokens, cfg.decode_tokens) == (
        "exponential", "keep_unterminated", 256, 256)
    with pytest.raises(ConfigError, match=r"fedcot.mechanism must be one of \['exponential', 'adaptive'\], got 'x'"):
        load_config(None, ['fedcot.mechanism="x"'])
    with pytest.raises(ConfigError, match=r"fedcot.truncated must be one of \['drop', 'keep_unterminated'\]"):
        load_config(None, ['fedcot.truncated="eos"'])
