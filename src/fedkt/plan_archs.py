"""Architectures ``fedkt plan`` knows without a local ``config.json``: the hyperparameters of public model
configs, copied from each model's ``config.json`` on the Hugging Face hub (the address is in ``source``).

Only the keys that decide the parameter count and the memory estimate are kept; ``fedkt plan`` builds the
model from them on PyTorch's ``meta`` device (no weights, no download) and counts its parameters exactly.
A spec ``hf:ORG/NAME`` (or a bare ``ORG/NAME``) whose id is listed here is planned from this table; any
other model needs its ``config.json`` in a local directory (``model.slm = "/path/to/dir"``).
"""

from __future__ import annotations

HUB = "https://huggingface.co/{}/blob/main/config.json"

_SMOLLM2 = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu")

KNOWN: dict[str, dict] = {
    # fedkt's built-ins (their cached config.json wins when present: ~/.cache/fedkt/NAME/config.json)
    "builtin:smollm2-135m": dict(_SMOLLM2, num_hidden_layers=30,
                                 source=HUB.format("HuggingFaceTB/SmolLM2-135M-Instruct")),
    "builtin:smollm2-slm": dict(_SMOLLM2, num_hidden_layers=16,
                                source="fedkt's derived SLM: 16 of smollm2-135m's 30 blocks (docs/derive-slm.md)"),
    # the FedCoLLM paper's pairs (Fan et al., arXiv 2411.11707)
    "openai-community/gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                                  vocab_size=50257, activation_function="gelu_new",
                                  source=HUB.format("openai-community/gpt2")),
    "openai-community/gpt2-large": dict(model_type="gpt2", n_embd=1280, n_layer=36, n_head=20, n_positions=1024,
                                        vocab_size=50257, activation_function="gelu_new",
                                        source=HUB.format("openai-community/gpt2-large")),
    "facebook/opt-1.3b": dict(model_type="opt", hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                              num_attention_heads=32, vocab_size=50272, max_position_embeddings=2048,
                              word_embed_proj_dim=2048, do_layer_norm_before=True, enable_bias=True,
                              activation_function="relu", source=HUB.format("facebook/opt-1.3b")),
    "facebook/opt-6.7b": dict(model_type="opt", hidden_size=4096, ffn_dim=16384, num_hidden_layers=32,
                              num_attention_heads=32, vocab_size=50272, max_position_embeddings=2048,
                              word_embed_proj_dim=4096, do_layer_norm_before=True, enable_bias=True,
                              activation_function="relu", source=HUB.format("facebook/opt-6.7b")),
    "princeton-nlp/Sheared-LLaMA-1.3B": dict(model_type="llama", hidden_size=2048, intermediate_size=5504,
                                             num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                             vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                             tie_word_embeddings=False, hidden_act="silu",
                                             source=HUB.format("princeton-nlp/Sheared-LLaMA-1.3B")),
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                     tie_word_embeddings=False, hidden_act="silu",
                                     source=HUB.format("meta-llama/Llama-2-7b-hf")),
    # FedCoT / FDKT clients and teacher (FATE-LLM's tutorials pair a 0.5B-1.5B client with a 7B instruct LLM)
    "Qwen/Qwen2-0.5B": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                            num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                            max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
                            tie_word_embeddings=True, hidden_act="silu", source=HUB.format("Qwen/Qwen2-0.5B")),
    "Qwen/Qwen2-1.5B": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                            num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                            max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
                            tie_word_embeddings=True, hidden_act="silu", source=HUB.format("Qwen/Qwen2-1.5B")),
    "Qwen/Qwen2-7B-Instruct": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                   vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                                   source=HUB.format("Qwen/Qwen2-7B-Instruct")),
}

ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-large": "openai-community/gpt2-large",
           "opt-1.3b": "facebook/opt-1.3b", "opt-6.7b": "facebook/opt-6.7b",
           "sheared-llama-1.3b": "princeton-nlp/Sheared-LLaMA-1.3B", "llama-2-7b": "meta-llama/Llama-2-7b-hf",
           "qwen2-0.5b": "Qwen/Qwen2-0.5B", "qwen2-1.5b": "Qwen/Qwen2-1.5B",
           "qwen2-7b-instruct": "Qwen/Qwen2-7B-Instruct"}
"""Short names; ``hf:gpt2`` (the hub's legacy id) and the names above resolve to the table's entries."""


def known(name: str) -> dict | None:
    """The table's config for a hub id / alias (case-insensitive), or None."""
    key = ALIASES.get(name.lower(), name)
    for k, v in KNOWN.items():
        if k.lower() == key.lower():
            return dict(v)
    return None
