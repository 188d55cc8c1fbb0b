"""Local data for lm-evaluation-harness tasks: a ``custom_dataset`` function that task YAMLs name, so that
lm-eval reads ``DATA_DIR/SUBDIR/SPLIT.jsonl`` instead of the Hugging Face hub.

A task YAML (``examples/harness/arc_easy_local.yaml``) says::

    custom_dataset: !function fedkt.data.harness_local.jsonl_dataset
    dataset_kwargs:
      subdir: arc_easy

and lm-eval calls ``jsonl_dataset(**task metadata, **dataset_kwargs)``; the data directory comes from the
task manager's metadata: ``fedkt eval --harness ... --data-dir DIR`` passes it, and so does
``lm_eval ... --metadata '{"data_dir": "DIR"}'``. Rows are read as they are, in the hub's schema (ARC's
``question`` + ``choices{text,label}`` + ``answerKey``); AI2's original OpenBookQA/CommonsenseQA schema
(``question{stem,choices[{label,text}]}``) is converted to the hub's (``question_stem`` + ``choices``).
Nothing is written to the datasets cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPLITS = ("train", "validation", "test")


def hub_row(row: dict[str, Any]) -> dict[str, Any]:
    """A local row in the hub's schema the harness's YAMLs read (AI2 original -> hub; others unchanged)."""
    q = row.get("question")
    if isinstance(q, dict):  # AI2 OpenBookQA / original CommonsenseQA
        choices = {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}
        return {"id": row.get("id", ""), "question_stem": q["stem"], "question": q["stem"], "choices": choices,
                "answerKey": row["answerKey"]}
    if "question_stem" in row and "question" not in row:
        return {**row, "question": row["question_stem"]}
    return row


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(hub_row(json.loads(line)))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{i}: not a JSON object in the hub's schema ({e})") from None
    return rows


def jsonl_dataset(data_dir: str | None = None, subdir: str | None = None, **_: Any):
    """lm-eval ``custom_dataset``: a ``datasets.DatasetDict`` with one split per ``DATA_DIR/SUBDIR/*.jsonl``
    file (``test.jsonl`` -> split ``test``); ``train``, ``validation`` and ``test`` are always there (empty
    when their file is missing: lm-eval builds a task's few-shot sampler from the splits its YAML names even
    at zero shots; few-shot evaluation needs the file)."""
    import datasets

    if not data_dir:
        raise ValueError(f"the local task over {subdir!r} needs a data directory: pass `fedkt eval --data-dir DIR` "
                         "or `lm_eval --metadata '{\"data_dir\": \"DIR\"}'` (DIR holds SUBDIR/SPLIT.jsonl)")
    if not subdir:
        raise ValueError("the task YAML's dataset_kwargs must name the folder under the data directory: "
                         "dataset_kwargs: {subdir: arc_easy}")
    root = Path(data_dir).expanduser() / subdir
    files = sorted(root.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{root}: no SPLIT.jsonl files (expected e.g. {root / 'test.jsonl'}); "
                                "check --data-dir")
    splits = {p.stem: datasets.Dataset.from_list(read_jsonl(p)) for p in files}
    for name in SPLITS:
        splits.setdefault(name, datasets.Dataset.from_list([]))
    return datasets.DatasetDict(splits)
