import json

import pytest

from fedkt.data.partition import partition, split_aux, subsample
from fedkt.data.tasks import DataError, final_number, load_jsonl, load_task, parse_row


def test_arc_schema_with_digit_labels():
    ex = parse_row({"id": "a", "question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
                    "answerKey": "3"}, "arc_easy", "f")
    assert ex.choices == ("x", "y", "z") and ex.answer == 2 and ex.target == "z"


def test_obqa_original_schema():
    ex = parse_row({"id": "o", "question": {"stem": "Stem?", "choices": [{"label": "A", "text": "p"},
                                                                         {"label": "B", "text": "q"}]},
                    "answerKey": "B"}, "openbookqa", "f")
    assert ex.question == "Stem?" and ex.answer == 1


def test_generic_mc_and_generation():
    ex = parse_row({"question": "Q", "choices": ["a", "b", "c"], "answer": 2}, "custom", "f-1")
    assert ex.answer == 2 and ex.id == "f-1"
    assert parse_row({"question": "Q", "choices": ["a", "b"], "answer": "B"}, "c", "x").answer == 1
    assert parse_row({"question": "Q", "choices": ["a", "b"], "answer": "1"}, "c", "x").answer == 0
    g = parse_row({"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7 apples\n#### 7"}, "gsm8k", "g")
    assert g.label == "7" and not g.is_mc
    assert g.target == "3 + 4 = 7 apples\nThe answer is 7."


def test_final_number():
    assert final_number("so 1,234 dollars\n#### 1,234") == "1234"
    assert final_number("The answer is 3.50.") == "3.5"
    assert final_number("no numbers") == ""
    assert final_number("we get -12 then 8") == "8"


def test_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    rows = [{"question": "Q", "choices": ["a", "b"], "answer": 0},
            {"question": "Q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"},
            "not json"]
    p.write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in rows) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: answer key 'E' is not among the choice labels \['A', 'B'\]"):
        load_jsonl(p)
    with pytest.warns(UserWarning, match="skipped 2 bad row"):
        assert len(load_jsonl(p, on_bad_line="skip")) == 1


def test_malformed_json_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"question": "Q", "choices": ["a", "b"], "answer": 0}\n{oops\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: "):
        load_jsonl(p)


def test_missing_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match=r"no data file .*openbookqa.*validation.*check data.dir"):
        load_task("openbookqa", "validation", tmp_path)
    with pytest.raises(DataError, match="fedkt ships only ARC-Easy"):
        load_task("gsm8k", "train")


def test_bundled_arc_easy():
    rows = load_task("arc_easy", "test")
    assert len(rows) == 2376 and all(r.is_mc and 0 <= r.answer < len(r.choices) for r in rows)
    assert len(load_task("arc_easy", "train")) == 2251


def _exs(n):
    return [parse_row({"id": str(i), "question": f"q{i}", "choices": ["a", "b", "c", "d"], "answer": i % 4},
                      "t", str(i)) for i in range(n)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_deterministic_disjoint_complete(scheme):
    exs = _exs(103)
    a = partition(exs, 4, scheme, seed=7, alpha=0.3)
    b = partition(exs, 4, scheme, seed=7, alpha=0.3)
    c = partition(exs, 4, scheme, seed=8, alpha=0.3)
    assert a == b and a != c
    ids = [e.id for part in a for e in part]
    assert len(ids) == len(set(ids)) == 103
    assert all(len(p) > 0 for p in a)
    if scheme == "iid":
        assert sorted(len(p) for p in a) == [25, 26, 26, 26]


def test_dirichlet_is_skewed():
    parts = partition(_exs(400), 4, "dirichlet", seed=0, alpha=0.1)
    # with alpha = 0.1 some client is dominated by one answer label
    fractions = [max(sum(e.answer == k for e in p) for k in range(4)) / len(p) for p in parts]
    assert max(fractions) > 0.6


def test_split_aux_and_subsample():
    exs = _exs(50)
    rest, aux = split_aux(exs, 10, seed=1)
    assert len(aux) == 10 and len(rest) == 40
    assert not {e.id for e in rest} & {e.id for e in aux}
    assert split_aux(exs, 10, seed=1) == (rest, aux)
    with pytest.raises(ValueError, match="aux_size"):
        split_aux(exs, 50, seed=0)
    s = subsample(exs, 5, seed=3)
    assert len(s) == 5 and s == subsample(exs, 5, seed=3) and [int(e.id) for e in s] == sorted(int(e.id) for e in s)


def test_hf_source_uses_datasets(monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return [{"id": "x", "question_stem": "Stem?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                 "answerKey": "B"}]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    rows = load_task("openbookqa", "test", "hf:")
    assert calls == [("allenai/openbookqa", "main", "test")] and rows[0].question == "Stem?" and rows[0].answer == 1
