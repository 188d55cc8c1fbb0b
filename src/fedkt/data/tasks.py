"""Benchmark tasks from their original JSONL schemas, plus a generic schema for your own data.

Every row becomes an :class:`Example`. Multiple-choice rows keep their choices and the index of the gold
one; generation rows (GSM8K) keep the worked answer as ``target`` and the final number as ``label``.

Accepted row shapes (detected per row):

* generic multiple choice: ``{"id", "question": str, "choices": [str, ...], "answer": int | label}``
  (``answer`` an index into ``choices``, or a letter "A".. / digit "1".. naming one);
* HF ARC / CommonsenseQA: ``{"id", "question": str, "choices": {"text": [...], "label": [...]}, "answerKey"}``;
* AI2 OpenBookQA / original CommonsenseQA: ``{"id", "question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}``;
* generation (GSM8K and generic): ``{"id"?, "question": str, "answer": str}``; a GSM8K answer ends in
  ``#### N`` and N becomes the label; otherwise the whole answer is the label.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

GENERATION_TASKS = {"gsm8k"}
BUNDLED = "bundled"


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    task: str
    id: str
    question: str
    choices: tuple[str, ...] = ()
    answer: int = -1
    """Index of the gold choice (multiple choice); -1 for generation."""
    target: str = ""
    """Text the model is trained to produce after the prompt."""
    label: str = ""
    """What generation is scored against (GSM8K: the final number)."""
    format: str = "harness"
    """Prompt format of a multiple-choice example, "harness" or "cloze" (``eval.format``; set by
    :func:`fedkt.data.prompts.with_format` where data is loaded): training and scoring read it."""

    @property
    def is_mc(self) -> bool:
        return bool(self.choices)


def bundled_dir() -> Path:
    return Path(str(resources.files("fedkt.data") / BUNDLED))


def task_path(task: str, split: str, data_dir: str | Path = "") -> Path:
    """Where ``task``'s ``split`` lives: ``DIR/TASK/SPLIT.jsonl``, or the bundled copy when DIR is empty."""
    base = Path(data_dir) if data_dir else bundled_dir()
    path = base / task / f"{split}.jsonl"
    if not path.is_file():
        hint = (
            "fedkt ships only ARC-Easy; point data.dir at a directory holding TASK/SPLIT.jsonl "
            "(e.g. data.dir = \"../shared/assets/data\")"
            if not data_dir
            else "check data.dir and the split name"
        )
        available = sorted(p.stem for p in (base / task).glob("*.jsonl")) if (base / task).is_dir() else []
        extra = f"; splits present: {', '.join(available)}" if available else ""
        raise DataError(f"no data file {path} for task {task!r} split {split!r}{extra}; {hint}")
    return path


_GSM_FINAL = re.compile(r"####\s*(.+)\s*$")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """'1,234.50' -> '1234.5'; anything unparsable is returned stripped."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(t)
    except ValueError:
        return t
    return str(int(v)) if v == int(v) else repr(v)


def final_number(text: str) -> str:
    """The final answer of a GSM8K-style text: after '####' if present, else the last number."""
    m = _GSM_FINAL.search(text)
    if m:
        return normalize_number(m.group(1))
    nums = _NUMBER.findall(text)
    return normalize_number(nums[-1]) if nums else ""


def _gold_index(key, labels: list[str], n: int) -> int:
    """Resolve an answer key (index, label, letter or 1-based digit) to a choice index."""
    if isinstance(key, bool):
        raise ValueError(f"answer key {key!r} is not among the choices")
    if isinstance(key, int):
        if 0 <= key < n:
            return key
        raise ValueError(f"answer index {key} is out of range for {n} choices")
    key = str(key).strip()
    if key in labels:
        return labels.index(key)
    raise ValueError(f"answer key {key!r} is not among the choice labels {labels}")


def parse_row(row: dict, task: str, fallback_id: str) -> Example:
    if not isinstance(row, dict):
        raise ValueError("row is not a JSON object")
    rid = str(row.get("id", fallback_id))
    q = row.get("question", row.get("question_stem"))  # HF allenai/openbookqa names it question_stem
    if isinstance(q, dict):  # AI2 original schema
        stem = q.get("stem")
        choices = q.get("choices")
        if not isinstance(stem, str) or not isinstance(choices, list):
            raise ValueError("'question' object needs 'stem' and a 'choices' list")
        texts = [c["text"] for c in choices]
        labels = [str(c["label"]) for c in choices]
        return _mc(task, rid, stem, texts, labels, row.get("answerKey"))
    if not isinstance(q, str):
        raise ValueError("missing 'question' (a string, or an object with 'stem')")
    choices = row.get("choices")
    if isinstance(choices, dict):  # HF ARC / CSQA
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise ValueError("'choices' needs 'text' and 'label' lists of equal length")
        return _mc(task, rid, q, texts, [str(x) for x in labels], row.get("answerKey"))
    if isinstance(choices, list):  # generic MC
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        key = row.get("answer", row.get("answerKey"))
        if isinstance(key, str) and key not in letters and key.isdigit():
            key = int(key) - 1
        return _mc(task, rid, q, choices, letters, key)
    if choices is not None:
        raise ValueError("'choices' must be a list or a {text, label} object")
    answer = row.get("answer")
    if not isinstance(answer, str):
        raise ValueError("a generation row needs an 'answer' string")
    target = _GSM_FINAL.sub(lambda m: f"The answer is {m.group(1).strip()}.", answer).strip()
    target = re.sub(r"<<[^>]*>>", "", target)
    return Example(task=task, id=rid, question=q.strip(), target=target, label=final_number(answer))


def _mc(task, rid, question, texts, labels, key) -> Example:
    if len(texts) < 2:
        raise ValueError(f"needs at least 2 choices, got {len(texts)}")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("choice texts must be strings")
    if key is None:
        raise ValueError("missing answer key ('answerKey' or 'answer')")
    gold = _gold_index(key, labels, len(texts))
    texts = tuple(t.strip() for t in texts)
    return Example(task=task, id=rid, question=question.strip(), choices=texts, answer=gold,
                   target=texts[gold], label=str(gold))


def load_jsonl(path: str | Path, task: str = "custom", on_bad_line: str = "error") -> list[Example]:
    """Read one JSONL file. Bad rows raise :class:`DataError` naming file and line, or are skipped
    (``on_bad_line="skip"``) with a warning that gives the count."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    out: list[Example] = []
    skipped: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append(parse_row(row, task, f"{path.stem}-{lineno}"))
            except (ValueError, KeyError, TypeError) as e:
                msg = f"{path}:{lineno}: {e if not isinstance(e, KeyError) else f'missing key {e}'}"
                if on_bad_line == "skip":
                    skipped.append(msg)
                    continue
                raise DataError(msg + " (set data.on_bad_line = \"skip\" to skip bad rows)") from None
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} bad row(s); first: {skipped[0]}", stacklevel=2)
    if not out:
        raise DataError(f"{path}: no usable rows")
    return out


HF_DATASETS = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "openbookqa": ("allenai/openbookqa", "main"),
    "commonsense_qa": ("tau/commonsense_qa", None),
    "gsm8k": ("openai/gsm8k", "main"),
}


def load_hf_task(task: str, split: str, on_bad_line: str = "error") -> list[Example]:
    """Load a task from the Hugging Face hub with ``datasets`` (online only; ``data.dir = "hf:"``)."""
    try:
        import datasets
    except ImportError:
        raise DataError('data.dir = "hf:" needs the datasets package: pip install datasets') from None
    if task not in HF_DATASETS:
        raise DataError(f"no hub dataset is known for task {task!r}; known: {', '.join(HF_DATASETS)}")
    path, name = HF_DATASETS[task]
    try:
        rows = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # noqa: BLE001 - offline or unknown split
        raise DataError(f"could not load {path} ({name}) split {split!r} from the hub: {e}. Offline, "
                        f"point data.dir at a directory of TASK/SPLIT.jsonl files instead.") from None
    out, bad = [], 0
    for i, row in enumerate(rows):
        try:
            out.append(parse_row(dict(row), task, f"{task}-{split}-{i}"))
        except (ValueError, KeyError, TypeError) as e:
            if on_bad_line != "skip":
                raise DataError(f"hub {path}/{split} row {i}: {e}") from None
            bad += 1
    if bad:
        warnings.warn(f"hub {path}/{split}: skipped {bad} bad row(s)", stacklevel=2)
    return out


def load_task(task: str, split: str, data_dir: str | Path = "", on_bad_line: str = "error") -> list[Example]:
    """A task's split from ``DATA_DIR/TASK/SPLIT.jsonl``, the bundled copy (empty dir) or the hub ("hf:")."""
    if str(data_dir) == "hf:":
        return load_hf_task(task, split, on_bad_line)
    return load_jsonl(task_path(task, split, data_dir), task=task, on_bad_line=on_bad_line)
