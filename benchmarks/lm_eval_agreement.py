"""fedkt's multiple-choice evaluation vs lm-evaluation-harness 0.4.13, same model, split and docs.

    pip install -e ".[harness]"          # lm-eval==0.4.13, in its own venv if you like
    flock /tmp/heavy.lock env OMP_NUM_THREADS=2 python benchmarks/lm_eval_agreement.py \\
        --model ~/.cache/fedkt/smollm2-135m --data-dir ../shared/assets/data --limit 300

For each task it scores the first ``--limit`` documents of the split with both (the harness's ``limit``
also takes the first N) in one process, same thread count, and prints acc / acc_norm of both, the
number of questions whose prompt strings (context, continuations) differ, whose prediction (argmax, and argmax of the normalised score) differs, the largest
difference of a choice's log-likelihood, and both wall times with their ratio. The two run
interleaved, in blocks of ``--block`` documents (harness block, fedkt block, next...), so that a change
of machine load hits both alike; each side's time is the sum over its blocks. Times exclude model
loading; "harness lls" is the harness's loglikelihood call alone, "harness total" its whole
``simple_evaluate`` (task building, requests, metrics; fedkt's blocks subtracted). fedkt's time covers prompts, tokenisation,
scoring and metrics.

Offline: the harness reads the local JSONL files, not the hub. Its task configs are used as shipped
(``include:`` of the installed YAML) with only the dataset swapped to ``json`` files in a temporary
directory, written in the Hugging Face schema the YAMLs expect (OpenBookQA's local AI2 schema is
converted to ``question_stem`` + ``choices{text,label}``). CommonsenseQA is supported the same way but
has no local data here (its test split has no labels; use ``--split validation`` with your own copy).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from fedkt.data.tasks import Example, task_path  # noqa: E402

HARNESS_YAML = {  # task -> YAML of lm_eval/tasks that defines it
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "commonsense_qa": "commonsense_qa/default.yaml",
}


def hf_row(row: dict) -> dict:
    """A local row in the Hugging Face schema the harness's YAML reads (AI2 original -> HF)."""
    q = row.get("question")
    if isinstance(q, dict):  # AI2 OpenBookQA / original CommonsenseQA
        choices = {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}
        return {"id": row["id"], "question_stem": q["stem"], "question": q["stem"], "choices": choices,
                "answerKey": row["answerKey"]}
    if "question_stem" in row and "question" not in row:
        row = {**row, "question": row["question_stem"]}
    return row


def harness_task_dir(tasks: list[str], data_dir: str, split: str, limit: int, out: Path) -> dict[str, str]:
    """Write, per task, the first ``limit`` rows as HF-schema JSONL and a YAML that includes the
    harness's own task config with only the dataset replaced. Returns {task: harness task name}."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    names = {}
    for t in tasks:
        rows = []
        with task_path(t, split, data_dir).open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows.append(hf_row(json.loads(line)))
                if len(rows) == limit:
                    break
        data = out / f"{t}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        name = f"local_{t}"
        (out / f"{name}.yaml").write_text(
            f"include: {root / HARNESS_YAML[t]}\n"
            f"task: {name}\n"
            "tag: []\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {data}\n"
            "training_split: null\n"
            "validation_split: null\n"
            f"test_split: {split}\n"
            "fewshot_split: null\n", encoding="utf-8")
        names[t] = name
    return names


def load_examples(task: str, data_dir: str, split: str, limit: int) -> list[Example]:
    from fedkt.data.tasks import load_task

    exs = load_task(task, split, data_dir)
    return exs[:limit] if limit else exs


def run_interleaved(lm, name: str, task_manager, limit: int, score_fedkt, n_docs: int, block: int):
    """Run the harness's ``simple_evaluate`` and, interleaved with its loglikelihood calls in blocks of
    ``block`` documents, ``score_fedkt(doc_ids)`` on the same documents, so both see the same machine
    load. Returns (harness metrics, per-doc samples sorted by doc_id, fedkt's per-doc results,
    seconds in the harness's loglikelihood, seconds in fedkt, seconds in the harness in total)."""
    import lm_eval

    spent = {"harness": 0.0, "fedkt": 0.0}
    fedkt_out: dict[int, object] = {}
    inner = lm.loglikelihood

    def interleaved(requests, *a, **k):
        by_doc: dict[int, list[int]] = {}
        for j, r in enumerate(requests):
            by_doc.setdefault(r.doc_id, []).append(j)
        docs = sorted(by_doc)
        out = [None] * len(requests)
        for start in range(0, len(docs), block):
            ids = docs[start:start + block]
            idx = [j for d in ids for j in by_doc[d]]
            t = time.perf_counter()
            res = inner([requests[j] for j in idx], *a, **k)
            spent["harness"] += time.perf_counter() - t
            for j, v in zip(idx, res):
                out[j] = v
            t = time.perf_counter()
            fedkt_out.update(zip(ids, score_fedkt(ids)))
            spent["fedkt"] += time.perf_counter() - t
        return out

    lm.loglikelihood = interleaved
    t0 = time.perf_counter()
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=task_manager, limit=limit or None,
                                      num_fewshot=0, log_samples=True, bootstrap_iters=0,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                      fewshot_random_seed=0)
    finally:
        lm.loglikelihood = inner
    total = time.perf_counter() - t0 - spent["fedkt"]
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    if len(fedkt_out) != n_docs:
        raise SystemExit(f"{name}: the harness asked for {len(fedkt_out)} docs, fedkt has {n_docs}")
    return res["results"][name], samples, [fedkt_out[i] for i in range(n_docs)], spent["harness"], \
        spent["fedkt"], total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(Path.home() / ".cache/fedkt/smollm2-135m"),
                    help="a local Hugging Face model directory (loaded by both, fp32)")
    ap.add_argument("--tasks", default="arc_easy,arc_challenge,openbookqa")
    ap.add_argument("--data-dir", default="../shared/assets/data")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=300, help="first N documents per task; 0 = all")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per forward pass, both sides")
    ap.add_argument("--block", type=int, default=50,
                    help="documents per interleaved block (harness, then fedkt, then the next block)")
    ap.add_argument("--precision", default="model", choices=["model", "bf16-checked"],
                    help="fedkt's scoring arithmetic (eval.precision); the harness always scores in fp32")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from fedkt.data.prompts import context, continuations
    from fedkt.eval_checked import CheckStats
    from fedkt.evaluate import choice_loglikelihoods, predictions
    from fedkt.models import load_model

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in HARNESS_YAML]
    if unknown:
        raise SystemExit(f"no harness task is known for {unknown}; known: {', '.join(HARNESS_YAML)}")
    model, tok = load_model(a.model)
    lm = HFLM(pretrained=a.model, dtype="float32", batch_size=a.batch_size, device="cpu")
    print(f"model {a.model}, split {a.split}, limit {a.limit or 'all'}, batch {a.batch_size}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, fedkt precision {a.precision}")
    header = (f"{'task':<14} {'n':>5} | {'acc fedkt':>9} {'harness':>8} | {'acc_norm fedkt':>14} {'harness':>8} | "
              f"{'diff prompt':>11} {'pred':>4} {'norm':>4} {'max|dll|':>9} | {'fedkt s':>8} {'harness lls s':>13} "
              f"{'total s':>8} {'speed-up':>8}")
    with torch.inference_mode():  # warm-up of both, outside the timings
        lm._model_call(torch.tensor([tok("Question: warm-up\nAnswer: yes")["input_ids"]]))
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        names = harness_task_dir(tasks, a.data_dir, a.split, a.limit, Path(tmp))
        tm = TaskManager(include_path=tmp, include_defaults=True)
        for t in tasks:
            exs = load_examples(t, a.data_dir, a.split, a.limit)
            choice_loglikelihoods(model, tok, exs[:2], batch_size=a.batch_size)  # warm-up
            if a.precision != "model":  # and of the bf16 kernels
                choice_loglikelihoods(copy.deepcopy(model).to(torch.bfloat16), tok, exs[:2], batch_size=a.batch_size)

            checks: list[CheckStats] = []

            def score_fedkt(ids, exs=exs, checks=checks):
                checks.append(CheckStats())
                return choice_loglikelihoods(model, tok, [exs[i] for i in ids], batch_size=a.batch_size,
                                             precision=a.precision, stats=checks[-1])

            h_metrics, samples, lls, h_lls, f_time, h_total = run_interleaved(
                lm, names[t], tm, a.limit, score_fedkt, len(exs), a.block)
            preds = [predictions(e, ll) for e, ll in zip(exs, lls)]
            acc = sum(p == e.answer for (p, _), e in zip(preds, exs)) / len(exs)
            acc_norm = sum(q == e.answer for (_, q), e in zip(preds, exs)) / len(exs)
            if len(samples) != len(exs):
                raise SystemExit(f"{t}: harness scored {len(samples)} docs, fedkt {len(exs)}")
            d_pred = d_norm = d_prompt = 0
            max_dll = 0.0
            for s, e, ll, (p, q) in zip(samples, exs, lls, preds):
                ours = [(context(e), c) for c in continuations(e)]
                d_prompt += [tuple(r) for r in s["arguments"]] != ours
                h_ll = [float(r[0]) for r in s["filtered_resps"]]
                hp, hq = predictions(e, h_ll)
                d_pred += hp != p
                d_norm += hq != q
                max_dll = max(max_dll, max(abs(x - y) for x, y in zip(h_ll, ll)))
            h_acc, h_norm = h_metrics["acc,none"], h_metrics.get("acc_norm,none", float("nan"))
            line = (f"{t:<14} {len(exs):>5} | {acc:>9.4f} {h_acc:>8.4f} | {acc_norm:>14.4f} {h_norm:>8.4f} | "
                    f"{d_prompt:>11} {d_pred:>4} {d_norm:>4} {max_dll:>9.1e} | {f_time:>8.1f} {h_lls:>13.1f} "
                    f"{h_total:>8.1f} {h_lls / f_time:>7.2f}x")
            lines.append(line)
            print(header if len(lines) == 1 else "", line, sep="\n" if len(lines) == 1 else "", flush=True)
            if a.precision != "model":
                for c in checks:
                    how = (f"{c.rescored} re-scored in fp32" if c.checked else
                           "too close for bf16: the rest scored in fp32" if c.calibration else "scored in fp32")
                    print(f"  {t} bf16-checked: {c.n} questions, {c.calibration} in the sample ({c.close} under "
                          f"the bar {c.bar:.3g} = 4 x largest shift {c.shift:.3g}), {how}", flush=True)


if __name__ == "__main__":
    main()
