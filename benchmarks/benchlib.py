"""Shared by the framework benchmarks: tiny models built in code, a config builder, exclusive timers.

* :func:`make_tiny_pair` saves two same-tokenizer random Llamas (an SLM and a wider, deeper LLM) with a
  tiny byte-level BPE tokenizer trained in code (the recipe of ``tests/conftest.py``); no downloads.
* :func:`bench_config` is an :class:`~fedkt.config.ExperimentConfig` for a benchmark run (bundled
  ARC-Easy data, no per-round evaluation).
* :func:`run_deployed` runs an experiment with ``fedkt flower run`` over a fresh local Flower deployment.
* :class:`Timers` monkeypatches functions so each call's *exclusive* time (its own time minus the time of
  wrapped calls nested inside it) is added to a named category; the categories then add up to at most
  the wall time of the measured region, with no double counting.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CORPUS = [
    "Question: Which gas do plants take in for photosynthesis?\nAnswer: carbon dioxide",
    "Question: What is the boiling point of water at sea level?\nAnswer: 100 degrees Celsius",
    "Question: Which planet is closest to the Sun?\nAnswer: Mercury",
    "Question: What force pulls objects toward Earth?\nAnswer: gravity",
    "The answer is 42. Natalia sold clips to 48 of her friends in April.",
    "oxygen nitrogen helium hydrogen water rock sand soil wind rain snow ice heat light sound energy",
    "A B C D 1 2 3 4 5 6 7 8 9 0 . , ? ! : ; ' \" ( ) - + = # $ %",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def make_tiny_model(root: Path, name: str, layers: int, hidden: int, seed: int, tok=None) -> Path:
    """Save a random tiny Llama (tied embeddings, 4 heads, 2 KV heads) with the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tok or make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, initializer_range=0.3)
    d = root / name
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def make_tiny_pair(root: Path) -> dict[str, Path]:
    """The golden tests' shapes: SLM 2 layers x 32 wide, LLM 4 layers x 48 wide, same tokenizer."""
    tok = make_tokenizer()
    return {"slm": make_tiny_model(root, "slm", 2, 32, 1, tok), "llm": make_tiny_model(root, "llm", 4, 48, 2, tok)}


def bench_config(slm: str, methods: list[str], clients: int, per_client: int, aux: int = 0, llm: str = "",
                 extra: list[str] | None = None):
    """2 x 16-style benchmark config on the bundled ARC-Easy train split; evaluation only when forced."""
    from fedkt.registry import load_config

    sets = [f'model.slm="{slm}"', f"methods={json.dumps(methods)}", f"partition.num_clients={clients}",
            f"partition.aux_size={aux}", f"data.max_train_examples={clients * per_client + aux}",
            "eval.every_round=false"]
    if llm:
        sets.append(f'model.llm="{llm}"')
    return load_config(None, sets + list(extra or []))


class Timers:
    """Exclusive wall time per category of monkeypatched functions.

    ``patch(owner, attr, category)`` replaces ``owner.attr`` with a timing wrapper; ``restore()`` undoes
    every patch. A wrapped call nested in another wrapped call is charged to its own category only."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []  # per active call: [start, nested seconds]
        self._patches: list[tuple[Any, str, Any]] = []

    def wrap(self, fn: Callable, category: str) -> Callable:
        def timed(*a, **k):
            frame = [time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*a, **k)
            finally:
                self._stack.pop()
                total = time.perf_counter() - frame[0]
                self.seconds[category] += total - frame[1]
                self.calls[category] += 1
                if self._stack:
                    self._stack[-1][1] += total
        timed.__wrapped__ = fn
        return timed

    def patch(self, owner: Any, attr: str, category: str) -> None:
        orig = getattr(owner, attr)
        self._patches.append((owner, attr, orig))
        setattr(owner, attr, self.wrap(orig, category))

    def replace(self, owner: Any, attr: str, fn: Callable) -> None:
        self._patches.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, fn)

    def restore(self) -> None:
        for owner, attr, orig in reversed(self._patches):
            setattr(owner, attr, orig)
        self._patches.clear()

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def run_deployed(config: Path, out: Path, root: Path, clients: list[str], client_files: dict[str, Path],
                 timeout: float) -> tuple[float, float]:
    """``fedkt flower run`` of experiment ``config`` (run directory ``out``) over a fresh SuperLink and one
    SuperNode per client (``client_files[cid]``) on 127.0.0.1, insecure, under ``root``/deploy; stopped
    whatever happens. Returns (deployment start s, run wall s); exits with the ServerApp's log tail when
    the run does not complete. Needs the ``flower`` extra."""
    from fedkt.federation import flower_cli
    from fedkt.federation.flower_deploy import LocalFlowerDeployment

    dep = LocalFlowerDeployment(root / "deploy", clients, client_files=client_files)
    try:
        t0 = time.perf_counter()
        dep.start()
        start_s = time.perf_counter() - t0
        home = root / "ctl"
        flower_cli.write_connection(home, dep.control_address)  # the operator listener (Control API)
        t0 = time.perf_counter()
        run_id, status = flower_cli.submit_experiment(config, out, home, timeout=timeout)
        wall = time.perf_counter() - t0
        if status != "finished:completed":
            print(flower_cli.run_log(run_id, home)[-6000:])
            raise SystemExit(f"deployed run {run_id}: {status}")
    finally:
        dep.stop()
    return start_s, wall


def tiny_fedcollm_sets(out: Path, aux_size: int, max_train_examples: int, rounds: int, kd_steps: int) -> list[str]:
    """--set overrides of a seconds-long FedCoLLM check on the tiny pair under ``out/models`` (built once)."""
    models = out / "models"
    dirs = ({"slm": models / "slm", "llm": models / "llm"} if (models / "llm" / "config.json").is_file()
            else make_tiny_pair(models))
    return [f'model.slm="{dirs["slm"]}"', f'model.llm="{dirs["llm"]}"', "partition.num_clients=2",
            f"partition.aux_size={aux_size}", f"data.max_train_examples={max_train_examples}",
            f"federation.rounds={rounds}", "train.batch_size=4", "train.max_length=96", "lora.r=4",
            f"fedcollm.kd_steps={kd_steps}", "fedcollm.batch_size=4", "eval.limit=16", "eval.batch_size=16"]
