"""``fedkt eval --harness TASKS``: a model (+ peft adapter) scored by lm-evaluation-harness itself, on any of
its tasks, groups or tags (``mmlu``, ``arc_easy``, ...) or task YAMLs of your own (``--include-path``).

fedkt loads the model as for every other command (``builtin:``, a directory, ``.gguf``, ``hf:``), applies the
adapter with peft, wraps both in lm-eval's ``HFLM`` and calls ``lm_eval.simple_evaluate``: the prompts,
few-shot contexts, metrics and aggregation (groups such as MMLU) are lm-eval's, so the numbers compare
with leaderboards that run lm-eval. lm-eval is an optional extra (``pip install 'fedkt[harness]'``).

Offline: lm-eval's own tasks load their datasets from the Hugging Face hub. Unless the environment says
otherwise, fedkt sets ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1``, so a task is read from the
datasets cache (filled earlier on a machine with network) or fails at once with an error that says so;
local files need a task YAML (``dataset_path: json`` + ``data_files``, or fedkt's ``custom_dataset``
reader, ``fedkt.data.harness_local``; docs/evaluation.md).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Sequence

INSTALL = "pip install 'fedkt[harness]'"
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


class HarnessError(Exception):
    """lm-eval is missing, a task is unknown or cannot be loaded; the message says what to do."""


def require_lm_eval():
    """The ``lm_eval`` module, or a :class:`HarnessError` that says how to install it."""
    try:
        import lm_eval
    except ImportError as e:
        raise HarnessError(f"--harness runs lm-evaluation-harness, which is not installed ({e}): {INSTALL} "
                           "(lm-eval 0.4.13); fedkt's own scorer needs no extra (drop --harness)") from None
    return lm_eval


def set_offline(environ=os.environ) -> dict[str, str]:
    """Default both Hugging Face offline switches to on (a value already set is kept); returns them."""
    for var in OFFLINE_VARS:
        environ.setdefault(var, "1")
    return {var: environ[var] for var in OFFLINE_VARS}


_MANAGERS: dict[str, Any] = {}


def task_manager(include_paths: Sequence[str | Path] = (), data_dir: str = ""):
    """lm-eval's ``TaskManager`` over its own tasks plus ``include_paths``, with ``data_dir`` in the metadata
    every task receives (fedkt's local reader takes it from there). Cached per arguments: building the
    index of ~15,000 tasks takes seconds."""
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).expanduser().resolve()) for p in include_paths]
    for p in paths:
        if not Path(p).exists():
            raise HarnessError(f"--include-path {p}: no such file or directory (a folder of task YAMLs)")
    meta = {"data_dir": str(Path(data_dir).expanduser().resolve())} if data_dir else None
    key = json.dumps([paths, meta])
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=paths or None, metadata=meta)
    return _MANAGERS[key]


def _unknown_task(name: str, tm) -> HarnessError:
    close = difflib.get_close_matches(name, tm.all_tasks, n=5, cutoff=0.7)
    hint = f" Close: {', '.join(close)}." if close else ""
    return HarnessError(f"--harness: {name!r} is not an lm-eval task, group or tag (lm-eval knows "
                        f"{len(tm.all_tasks)}; `lm_eval ls tasks` lists them).{hint} For your own data, write a "
                        "task YAML and pass its folder with --include-path DIR (docs/evaluation.md)")


def _load_error(name: str, e: BaseException) -> HarnessError:
    offline = ", ".join(f"{v}={os.environ.get(v, '')}" for v in OFFLINE_VARS)
    return HarnessError(
        f"--harness: task {name!r} could not be loaded: {type(e).__name__}: {e}\n"
        f"lm-eval's own tasks read their data from the Hugging Face hub ({offline}). Either fill the datasets "
        f"cache on a machine with network (run the task once there, copy ~/.cache/huggingface) or point a "
        f"task YAML at local files: `dataset_path: json` with `dataset_kwargs: {{data_files: {{test: FILE}}}}`, "
        f"or fedkt's reader (examples/harness/arc_easy_local.yaml with --data-dir), in a folder passed as "
        f"--include-path DIR; see docs/evaluation.md")


def load_tasks(names: Sequence[str], tm) -> list:
    """The Task/Group objects of ``names``, each loaded alone so that an error names its task."""
    objs: list = []
    for name in names:
        if name not in tm.all_tasks and not (name.endswith(".yaml") and Path(name).is_file()):
            raise _unknown_task(name, tm)
        try:
            loaded = tm.load([name])
        except HarnessError:
            raise
        except Exception as e:  # datasets' ConnectionError, FileNotFoundError, a YAML's own errors, ...
            raise _load_error(name, e) from e
        if name in loaded["groups"]:
            objs.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            objs.append(loaded["tasks"][name])
        else:  # a tag (or a YAML path): its tasks
            objs.extend(loaded["tasks"].values())
    return objs


def _leaf_count(name: str, res: dict) -> int | None:
    n = res.get("n-samples", {}).get(name, {}).get("effective")
    if n is not None:
        return int(n)
    kids = res.get("group_subtasks", {}).get(name)
    if not kids:
        return None
    counts = [_leaf_count(k, res) for k in kids]
    return sum(c for c in counts if c is not None)


def scores(res: dict) -> dict[str, dict[str, float]]:
    """lm-eval's results as ``fedkt eval`` prints them: {task: {metric: value, ..., "n": documents}} for
    every task and group; a metric under a filter other than ``none`` keeps it (``exact_match,strict-match``);
    non-numeric entries (``N/A`` stderrs, aliases) are left out."""
    out: dict[str, dict[str, float]] = {}
    for name, row in res["results"].items():
        s: dict[str, float] = {}
        for key, v in row.items():
            if "," not in key or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            s[metric if filt == "none" else key] = float(v)
        n = _leaf_count(name, res)
        if n is not None:
            s["n"] = n
        out[name] = s
    return out


def table(res: dict) -> str:
    """lm-eval's own Markdown tables (tasks, then groups), as its CLI prints them."""
    from lm_eval.utils import make_table

    text = make_table(res)
    if res.get("groups"):
        text += "\n" + make_table(res, "groups")
    return text


def harness_evaluate(model, tok, tasks: Sequence[str], *, limit: int = 0, batch_size: int = 32,
                     num_fewshot: int | None = None, include_paths: Sequence[str | Path] = (), data_dir: str = "",
                     seed: int = 0) -> dict:
    """Run lm-eval's ``simple_evaluate`` on ``tasks`` with ``model``/``tok`` (already loaded, adapter
    applied); ``limit`` = lm-eval's: the first N documents of each task (0: all). Returns lm-eval's result
    dict (``scores`` and ``table`` render it)."""
    lm_eval = require_lm_eval()
    set_offline()
    from lm_eval.models.huggingface import HFLM

    tm = task_manager(include_paths, data_dir)
    objs = load_tasks(list(tasks), tm)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=objs, task_manager=tm, limit=limit or None,
                                   num_fewshot=num_fewshot, log_samples=False, random_seed=seed,
                                   numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


def evaluate_with_harness(spec: str, tasks: Sequence[str], adapter=None, dtype: str = "float32", device: str = "cpu",
                          **kw) -> dict:
    """Load model ``spec`` (plus a peft ``adapter`` directory) as ``fedkt eval`` does, on ``device`` in
    ``dtype`` (as ``model.device``/``model.dtype``), and run :func:`harness_evaluate`: what ``fedkt eval
    --harness`` runs."""
    require_lm_eval()
    set_offline()  # before transformers/datasets read the switches
    # deferred: models imports torch and transformers; the missing-extra error above needs neither
    from fedkt.config import Placement
    from fedkt.models import load_model

    model, tok = load_model(spec, placement=Placement(device=device, dtype=dtype))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        model.eval()
    return harness_evaluate(model, tok, tasks, **kw)
