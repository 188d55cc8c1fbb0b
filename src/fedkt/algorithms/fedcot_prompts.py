"""FedCoT's prompts, as the paper's reference code (FATE-LLM's FedCoT/InferDPT tutorial) writes them.

* **What the client perturbs** (:func:`question_segments`): the question and its lettered choices in a
  public frame, ``Question: … \\nChoices: (A) … (B) …``. The frame's tokens are public (the same for every
  client; the server defined them) and pass unperturbed and uncharged (``fedkt.privacy.text_dp_frame``).
* **The teacher** (:func:`teacher_prompt`): the paper's instruction (select the answer, explain it in a
  "Rationale" in few words, refer to the example, finish with ``<end>``) and a worked example, in the
  LLM's chat format, then the perturbed question.
* **The decode prompt** (:func:`decode_prompt`, the client's SLM): the same instruction, the worked
  example, the (perturbed prompt, LLM rationale) pair, then ``Please explain:`` and the original question;
  each rationale of the examples ends with the end marker ``<end>``, which stops generation.
* **One input for both tasks** (:func:`label_pair`, :func:`rationale_pair`): as in distilling step by
  step (Hsieh et al. 2023) and FATE-LLM's ``PrefixDataset``, the label task and the rationale task see the
  same input, the question in the task's prompt, and differ only by a task prefix. fedkt's label task
  keeps the empty prefix so the evaluated prompt is exactly the trained one (evaluation scores the task's
  harness prompt, as for every method); the rationale task is ``"Explain:\\n"`` + that same input.
"""

from __future__ import annotations

from fedkt.data.prompts import training_text
from fedkt.data.tasks import Example
from fedkt.privacy.text_dp_frame import Segment

END = "<end>"
"""End marker of a rationale (FATE-LLM's ``<end>``): the teacher and the decoder are told to finish with it."""
INSTRUCTION = ('Select the answer from the choices and explain it in "Rationale" with few words. Please refer '
               f"to the example to write the rationale.\nUse {END} to finish your rationale.")
WORKED = (("Which gas do plants take in from the air to make food?", ("oxygen", "carbon dioxide", "nitrogen", "helium")),
          "Plants make food by photosynthesis, which takes in carbon dioxide from the air and gives off oxygen. "
          "So the answer is (B) carbon dioxide.")
"""The worked example (public; written for fedkt, in the style of FATE-LLM's ARC example)."""
EXPLAIN_PREFIX = "Explain:\n"
"""The rationale task's prefix; the label task's is empty (its input is the evaluated prompt)."""
STOP = [END, "\n\n", "\nQuestion:", "<|im_end|>", "<|endoftext|>"]


def question_segments(question: str, choices: tuple[str, ...] | list[str]) -> list[Segment]:
    """The perturbed prompt's pieces: (text, private). Public: ``Question:``, ``\\nChoices:``, `` (A)``…;
    private: the question and each choice text (each with its leading space)."""
    segs: list[Segment] = [("Question:", False), (" " + question, True)]
    if choices:
        segs.append(("\nChoices:", False))
        for i, c in enumerate(choices):
            segs += [(f" ({chr(65 + i)})", False), (" " + c, True)]
    return segs


def render_question(ex: Example) -> str:
    """The question and its lettered choices: ``Question: …\\nChoices: (A) … (B) …``."""
    return "".join(s for s, _ in question_segments(ex.question, ex.choices))


def teacher_user_message(perturbed: str) -> str:
    q, ch = WORKED[0]
    example = "".join(s for s, _ in question_segments(q, ch))
    return (f"{INSTRUCTION}\n\nExample:\n{example}\nRationale: {WORKED[1]}{END}\n\n"
            f"Please explain:\n{perturbed}\nRationale:")


def teacher_prompt(generator, perturbed: str) -> str:
    """The LLM's prompt for one perturbed question, in its chat format (``generator.chat_prompt``)."""
    return generator.chat_prompt(None, teacher_user_message(perturbed))


def one_line(text: str) -> str:
    """A rationale as the decode prompt shows it: on one line, without an end marker of its own."""
    return " ".join(text.replace(END, " ").split())


def decode_prompt(perturbed: str, rationale: str, ex: Example) -> str:
    """The paper's decode prompt: instruction, worked example, the (perturbed prompt, LLM rationale) pair,
    then the original question (only the client sees it)."""
    q, ch = WORKED[0]
    example = "".join(s for s, _ in question_segments(q, ch))
    return (f"{INSTRUCTION}\n\nExample(s):\n{example}\nRationale: {WORKED[1]}{END}\n\n"
            f"{perturbed}\nRationale: {one_line(rationale)}{END}\n\n"
            f"Please explain:\n{render_question(ex)}\nRationale:")


def label_pair(ex: Example) -> tuple[str, str]:
    """The label task: (input, answer) = the task's evaluated prompt and the gold continuation."""
    return training_text(ex)


def rationale_pair(ex: Example, rationale: str) -> tuple[str, str]:
    """The rationale task: the same input as the label task behind the ``Explain:`` prefix, the rationale."""
    return EXPLAIN_PREFIX + training_text(ex)[0], " " + rationale.strip()
