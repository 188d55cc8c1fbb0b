"""Privacy mechanisms run on the client side: token-level text DP (``text_dp``, its kit ``text_dp_kit``) and its audit (``audit``); DP-SGD for LoRA adapters (``dp_sgd``, imported on use: it needs opacus).

Attacks (docs/privacy-attacks.md), imported on use: ``attacks_text`` (contextual noisy-channel attack with an LM
prior, LLM restore, canaries), ``exposure`` (canary exposure, n-gram and text-DP channel attackers), ``membership``
(loss-threshold membership on uploaded adapters), ``audit_run`` (``fedkt audit``)."""

from fedkt.privacy.audit import CanaryHit, map_attack, render_audit_table, scan_for_canaries, text_dp_audit
from fedkt.privacy.text_dp import PerturbResult, perturb, perturb_batch, sample_replacements
from fedkt.privacy.text_dp_kit import (
    DEFAULT_N,
    SENSITIVITY,
    EmbeddingKit,
    KitMismatchError,
    embedding_fingerprint,
    textdp_cache_dir,
    tokenizer_fingerprint,
)

__all__ = [
    "CanaryHit", "DEFAULT_N", "EmbeddingKit", "KitMismatchError", "PerturbResult", "SENSITIVITY",
    "embedding_fingerprint", "map_attack", "perturb", "perturb_batch", "render_audit_table",
    "sample_replacements", "scan_for_canaries", "text_dp_audit", "textdp_cache_dir", "tokenizer_fingerprint",
]
