"""``fedkt eval --harness``: lm-evaluation-harness itself on a tiny random model and tiny local task YAMLs.

The missing-extra error runs always; the rest needs the optional extra (``pip install 'fedkt[harness]'``)
and skips without it (CI installs ``.[test,flower]`` only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import make_llama

EXAMPLES = Path(__file__).parent.parent / "examples" / "harness"
WORDS = ["oxygen", "nitrogen", "helium", "hydrogen", "water", "rock", "sand", "soil", "wind", "rain", "snow",
         "ice heat"]


def write_mc(path: Path, n: int, start: int = 0) -> Path:
    """n ARC-schema questions over words of the tiny tokenizer's corpus, gold at A, B, C, D in turn (the
    tiny random model then gets some right, and acc != acc_norm)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(start, start + n):
            ch = [WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(4)]
            f.write(json.dumps({"id": f"m{i}", "question": f"Which one is number {i}?",
                                "choices": {"text": ch, "label": list("ABCD")}, "answerKey": "ABCD"[i % 4]}) + "\n")
    return path


def test_missing_lm_eval_says_how_to_install(monkeypatch, capsys, tmp_path):
    from fedkt import cli
    from fedkt.harness_eval import HarnessError, evaluate_with_harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(HarnessError, match=r"pip install 'fedkt\[harness\]'"):
        evaluate_with_harness("builtin:smollm2-135m", ["arc_easy"])
    monkeypatch.setattr(sys, "argv", ["fedkt", "eval", "--harness", "arc_easy", "--json", str(tmp_path / "s.json")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not installed" in err and "pip install 'fedkt[harness]'" in err
    assert not (tmp_path / "s.json").exists()


def test_offline_switches_default_on_but_keep_a_set_value():
    from fedkt.harness_eval import set_offline

    env = {"HF_HUB_OFFLINE": "0"}
    assert set_offline(env) == {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "0"}


def test_local_reader_converts_the_ai2_schema(tmp_path):
    pytest.importorskip("datasets", reason="the local reader builds a datasets.DatasetDict (fedkt[harness])")
    from fedkt.data.harness_local import jsonl_dataset

    d = tmp_path / "openbookqa"
    d.mkdir()
    (d / "test.jsonl").write_text(json.dumps({"id": "o1", "question": {"stem": "The sun is", "choices": [
        {"label": "A", "text": "hot"}, {"label": "B", "text": "cold"}]}, "answerKey": "A"}) + "\n")
    ds = jsonl_dataset(data_dir=str(tmp_path), subdir="openbookqa", version=1.0)
    assert sorted(ds) == ["test", "train", "validation"] and (len(ds["train"]), len(ds["test"])) == (0, 1)
    assert ds["test"][0] == {"id": "o1", "question_stem": "The sun is", "question": "The sun is",
                             "choices": {"text": ["hot", "cold"], "label": ["A", "B"]}, "answerKey": "A"}
    with pytest.raises(FileNotFoundError, match="no SPLIT.jsonl files"):
        jsonl_dataset(data_dir=str(tmp_path), subdir="arc_easy")
    with pytest.raises(ValueError, match="--data-dir DIR"):
        jsonl_dataset(subdir="arc_easy")


# ---- with lm-eval installed -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'fedkt[harness]'")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tok):
    """A saved tiny random Llama (2 layers, seed 0) that scores 4/12 (acc) and 8/12 (acc_norm) on write_mc's
    first 12 questions."""
    d = tmp_path_factory.mktemp("harness_model") / "slm"
    make_llama(tok, layers=2, hidden=32, seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return {"slm": d}


def _json_task(folder: Path, data: Path, name: str = "tiny_arc") -> Path:
    """A task YAML as lm-eval's docs write one for local files: dataset_path json + data_files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'hf_cache'}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{choices.label.index(answerKey)}}"\n'
        'doc_to_choice: "{{choices.text}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return folder


def _fedkt_scores(model_dir, data_dir: Path, n: int) -> dict:
    from fedkt.data.tasks import load_task
    from fedkt.evaluate import score_multiple_choice
    from fedkt.models import load_model

    model, tok = load_model(str(model_dir))
    return score_multiple_choice(model, tok, load_task("arc_easy", "test", str(data_dir))[:n], batch_size=8)


def test_harness_scores_equal_fedkts_scorer_on_a_local_json_task(lm_eval, model_dirs, tmp_path):
    from fedkt.harness_eval import evaluate_with_harness, scores

    data = write_mc(tmp_path / "data" / "arc_easy" / "test.jsonl", 12, start=1000)
    tasks = _json_task(tmp_path / "tasks", data)
    res = evaluate_with_harness(str(model_dirs["slm"]), ["tiny_arc"], include_paths=[tasks], batch_size=4)
    s = scores(res)["tiny_arc"]
    ref = _fedkt_scores(model_dirs["slm"], tmp_path / "data", 12)
    assert (ref["acc"], ref["acc_norm"]) == (4 / 12, 8 / 12)  # the tiny model is no trivial scorer
    assert s["n"] == 12
    assert (s["acc"], s["acc_norm"]) == (ref["acc"], ref["acc_norm"])
    assert s["acc_stderr"] == pytest.approx((ref["acc"] * (1 - ref["acc"]) / 11) ** 0.5)
    # lm-eval's limit: the first N documents
    res = evaluate_with_harness(str(model_dirs["slm"]), ["tiny_arc"], include_paths=[tasks], limit=5)
    s5, ref5 = scores(res)["tiny_arc"], _fedkt_scores(model_dirs["slm"], tmp_path / "data", 5)
    assert (s5["n"], s5["acc"], s5["acc_norm"]) == (5, ref5["acc"], ref5["acc_norm"])


def test_shipped_arc_easy_yaml_is_the_harness_task_over_local_files(lm_eval, model_dirs, tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    from fedkt.harness_eval import evaluate_with_harness, scores

    ours = load_yaml(EXAMPLES / "arc_easy_local.yaml", resolve_func=False)
    theirs = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml", resolve_func=False)
    dataset_keys = {"dataset_path", "dataset_name", "custom_dataset", "dataset_kwargs"}
    assert {k: v for k, v in ours.items() if k not in dataset_keys | {"task", "tag"}} == \
        {k: v for k, v in theirs.items() if k not in dataset_keys | {"task", "tag"}}

    data_dir = tmp_path / "data"
    write_mc(data_dir / "arc_easy" / "test.jsonl", 8, start=1000)
    write_mc(data_dir / "arc_challenge" / "test.jsonl", 6, start=2000)
    res = evaluate_with_harness(str(model_dirs["slm"]), ["arc_easy_local", "arc_challenge_local"],
                                include_paths=[EXAMPLES], data_dir=str(data_dir), batch_size=4)
    s = scores(res)
    ref = _fedkt_scores(model_dirs["slm"], data_dir, 8)
    assert s["arc_easy_local"]["n"] == 8 and s["arc_challenge_local"]["n"] == 6
    assert (s["arc_easy_local"]["acc"], s["arc_easy_local"]["acc_norm"]) == (ref["acc"], ref["acc_norm"])


def test_cli_prints_the_table_and_writes_fedkt_shaped_json(lm_eval, model_dirs, tmp_path, monkeypatch, capsys):
    from fedkt import cli

    data = write_mc(tmp_path / "data" / "arc_easy" / "test.jsonl", 6, start=1000)
    tasks = _json_task(tmp_path / "tasks", data)
    out = tmp_path / "scores.json"
    monkeypatch.setattr(sys, "argv", ["fedkt", "eval", "--model", str(model_dirs["slm"]), "--harness", "tiny_arc",
                                      "--include-path", str(tasks), "--json", str(out)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    ref = _fedkt_scores(model_dirs["slm"], tmp_path / "data", 6)
    assert set(got) == {"tiny_arc"} and got["tiny_arc"]["n"] == 6
    assert got["tiny_arc"]["acc"] == ref["acc"] and got["tiny_arc"]["acc_norm"] == ref["acc_norm"]
    assert "|tiny_arc|" in printed.replace(" ", "") and f"tiny_arc: acc={ref['acc']:.4f}" in printed


def test_unknown_and_unloadable_tasks_are_named(lm_eval, model_dirs, tmp_path):
    from fedkt.harness_eval import HarnessError, evaluate_with_harness

    tasks = _json_task(tmp_path / "tasks", tmp_path / "missing.jsonl", name="tiny_missing")
    with pytest.raises(HarnessError, match=r"'arc_esay' is not an lm-eval task.*Close: arc_easy"):
        evaluate_with_harness(str(model_dirs["slm"]), ["arc_esay"], include_paths=[tasks])
    with pytest.raises(HarnessError, match=r"(?s)task 'tiny_missing' could not be loaded.*--include-path DIR"):
        evaluate_with_harness(str(model_dirs["slm"]), ["tiny_missing"], include_paths=[tasks])
    with pytest.raises(HarnessError, match=r"--include-path .*nowhere: no such file"):
        evaluate_with_harness(str(model_dirs["slm"]), ["tiny_arc"], include_paths=[tmp_path / "nowhere"])


def test_a_hub_task_offline_says_where_to_get_data(lm_eval, model_dirs):
    from fedkt.harness_eval import HarnessError, evaluate_with_harness

    with pytest.raises(HarnessError, match=r"(?s)task 'arc_easy' could not be loaded.*HF_HUB_OFFLINE=1.*"
                                           r"arc_easy_local.yaml"):
        evaluate_with_harness(str(model_dirs["slm"]), ["arc_easy"])


def test_a_peft_adapter_is_applied_as_fedkt_eval_applies_it(lm_eval, model_dirs, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fedkt.evaluate import evaluate_model
    from fedkt.harness_eval import evaluate_with_harness, scores

    torch.manual_seed(3)  # LoRA A's init and B below: the same adapter whatever ran before
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dirs["slm"]),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 2.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    data_dir = tmp_path / "data"
    tasks = _json_task(tmp_path / "tasks", write_mc(data_dir / "arc_easy" / "test.jsonl", 12))
    ref = evaluate_model(str(model_dirs["slm"]), ["arc_easy"], adapter=tmp_path / "adapter", data_dir=str(data_dir))
    base = _fedkt_scores(model_dirs["slm"], data_dir, 12)
    assert (ref["arc_easy"]["acc"], ref["arc_easy"]["acc_norm"]) != (base["acc"], base["acc_norm"])
    s = scores(evaluate_with_harness(str(model_dirs["slm"]), ["tiny_arc"], adapter=tmp_path / "adapter",
                                     include_paths=[tasks]))["tiny_arc"]
    assert (s["acc"], s["acc_norm"], s["n"]) == (ref["arc_easy"]["acc"], ref["arc_easy"]["acc_norm"], 12)
