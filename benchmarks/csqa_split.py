"""Split one CommonsenseQA file (the hub's schema, e.g. the 1,221-question validation split) into a
seeded ``test`` of N questions and a ``train`` of the rest, as ``OUT/commonsense_qa/{train,test}.jsonl``
for ``data.dir = OUT``: what the harness-vs-cloze measurement in docs/evaluation.md used (no
CommonsenseQA is stored under ../shared/assets/data).

    python benchmarks/csqa_split.py dev_rand_split.jsonl /tmp/format-runs/data --test 300 --seed 0
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="CommonsenseQA JSONL (one question per line)")
    ap.add_argument("out", type=Path, help="data directory to write commonsense_qa/{train,test}.jsonl under")
    ap.add_argument("--test", type=int, default=300, help="questions in the test split")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rows = [line if line.endswith("\n") else line + "\n" for line in a.source.read_text().splitlines(True)
            if line.strip()]
    if not 0 < a.test < len(rows):
        raise SystemExit(f"--test {a.test}: {a.source} has {len(rows)} questions")
    idx = list(range(len(rows)))
    random.Random(a.seed).shuffle(idx)
    test = set(idx[:a.test])
    d = a.out / "commonsense_qa"
    d.mkdir(parents=True, exist_ok=True)
    (d / "test.jsonl").write_text("".join(r for i, r in enumerate(rows) if i in test))
    (d / "train.jsonl").write_text("".join(r for i, r in enumerate(rows) if i not in test))
    print(f"{d}: train {len(rows) - a.test}, test {a.test}")


if __name__ == "__main__":
    main()
