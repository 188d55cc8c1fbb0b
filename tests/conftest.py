"""Fixtures: a tiny BPE tokenizer trained in code, tiny random Llama models, tiny data. No downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

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
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    return tok


def make_llama(tok, layers: int = 4, seed: int = 0, hidden: int = 32, init_range: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      initializer_range=init_range)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tok):
    """Saved tiny models: 'slm' (2 layers) and 'llm' (4 layers, wider), same tokenizer."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, layers, hidden, seed in (("slm", 2, 32, 1), ("llm", 4, 48, 2)):
        d = root / name
        m = make_llama(tok, layers=layers, hidden=hidden, seed=seed)
        m.save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = d
    return out


MC_ROWS = [
    ("Which gas do plants take in for photosynthesis?", ["oxygen", "carbon dioxide", "helium", "water"], "B"),
    ("What is the boiling point of water at sea level?", ["0 degrees", "50 degrees", "100 degrees Celsius"], "C"),
    ("Which planet is closest to the Sun?", ["Mercury", "Mars", "Venus", "Earth"], "A"),
    ("What force pulls objects toward Earth?", ["wind", "gravity", "light", "sound"], "B"),
]


def write_arc(path: Path, n: int, start: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(start, start + n):
            q, ch, key = MC_ROWS[i % len(MC_ROWS)]
            f.write(json.dumps({"id": f"q{i}", "question": f"{q} ({i})",
                                "choices": {"text": ch, "label": [chr(65 + j) for j in range(len(ch))]},
                                "answerKey": key}) + "\n")
    return path


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "data"
    write_arc(d / "arc_easy" / "train.jsonl", 64)
    write_arc(d / "arc_easy" / "test.jsonl", 12, start=1000)
    return d
