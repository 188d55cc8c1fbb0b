"""FDKT's settings: the ``[fdkt]`` section (docs/fdkt.md#settings-fdkt)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedkt.config import PATH, check, check_positive


@dataclass
class FDKTConfig:
    """The ``[fdkt]`` section."""

    epsilon: float = 3.0
    """Target ε of each client's DP-SGD (``inf``: no noise, clipping only: the non-private ablation)."""
    client_epsilons: list[float] = field(default_factory=list)
    """Per-client ε (client i gets entry i); empty: every client uses ``epsilon``."""
    delta: float = 1e-5
    """δ of the guarantee; each client's effective δ is min(delta, 1/n²) for its n examples."""
    max_grad_norm: float = 1.0
    """DP-SGD per-example clipping bound C."""
    dp_epochs: float = 3.0
    dp_batch_size: int = 16
    """Expected (Poisson) batch size of DP-SGD."""
    dp_lr: float = 1e-3
    samples_per_client: int = 64
    """Synthetic samples each client draws from its DP model."""
    sampling: Literal["template", "free"] = "template"
    """How the DP model writes a sample: ``"template"`` fills the template field by field (question line,
    then each choice after its label, the answer letter from the sampling plan; one KV cache per prompt
    from field to field: ``fedkt.algorithms.fdkt.template_fill``); ``"free"``: one free continuation of the
    prefix, parsed."""
    question_tokens: int = 64
    """Template sampling: at most this many tokens for the question line."""
    choice_tokens: int = 24
    """Template sampling: at most this many tokens per choice."""
    sample_tokens: int = 128
    """Free sampling: at most this many tokens per sample."""
    temperature: float = 1.0
    top_p: float = 0.95
    filter: Literal["auto", "score", "llm", "none"] = "auto"
    """How the LLM picks the eligible samples of each cluster: ``"score"``: each sample's log p(Yes) −
    log p(No) to an eligibility question, the best ``filter_keep`` fraction per cluster (needs a local
    LLM); ``"llm"``: the LLM lists the eligible samples' numbers, parsed (malformed = keep nothing);
    ``"auto"``: "score" with a local LLM, "llm" with an ``openai:`` server; ``"none"``: keep every parsed
    sample (ablation of step 2)."""
    filter_keep: float = 0.5
    """Scored filter: fraction of each cluster kept (rounded up), among the samples above ``filter_min_margin``."""
    filter_min_margin: float = 0.0
    """Scored filter's quality bar: only samples with log p(Yes) − log p(No) above this are kept, so a cluster
    the LLM rejects entirely keeps nothing (``-inf``: no bar, every cluster keeps its best fraction)."""
    dedup_jaccard: float = 0.6
    """Near-duplicate removal: a sample whose word-3-shingle Jaccard similarity (question + choices) to an
    earlier sample is at least this is dropped, among the received samples and among the augmented ones
    (against the kept and earlier augmented ones); above 1: off (exact duplicates are always dropped)."""
    kept_answers: Literal["auto", "relabel", "drop", "keep"] = "auto"
    """The kept DP samples' answer letters, which the DP model wrote: ``"relabel"``: the server LLM scores
    each choice by log-likelihood (as evaluation does) and its pick becomes the answer; ``"drop"``: samples
    whose letter is not the LLM's pick are dropped; ``"keep"``: unchecked; ``"auto"``: "relabel" with a
    local LLM, "keep" with an ``openai:`` server (no likelihoods). Runs before augmentation, so the few-shot
    examples carry checked answers too."""
    decontaminate_ngram: int = 13
    """n of the contamination check: a received or augmented sample sharing a word n-gram (question +
    choices, lower-cased, punctuation dropped) with any question of the evaluation sets is dropped and
    counted (GPT-3 / lm-eval decontamination; 0: off)."""
    cluster_size: int = 8
    """k-means uses k = ceil(samples / cluster_size) clusters."""
    filter_batch: int = 8
    """At most this many samples per filter prompt (larger clusters are split)."""
    embed_model: str = field(default="", metadata=PATH)
    """Local model whose mean-pooled hidden states embed the samples; empty: ``model.llm`` (the server's
    SLM copy when the LLM is an ``openai:`` server)."""
    augment_per_kept: float = 2.0
    """Augmentation prompts per kept sample (0: no augmentation)."""
    shots: int = 3
    augment_tokens: int = 160
    """Free augmentation: at most this many tokens per new example."""
    augment_temperature: float = 0.7
    augment_sampling: Literal["template", "free"] = "template"
    """How the LLM writes a new example: field by field in the template (question, choices, then the
    answer letter it picks; a local LLM keeps each prompt's KV cache from field to field), or one free
    continuation, parsed."""
    synthetic_set: Literal["augmented", "kept+augmented", "private+augmented", "private+synthetic"] = "augmented"
    """What each client trains its SLM on in step 4: ``"augmented"``: the LLM's new examples only, as the paper
    and FATE-LLM return them; ``"kept+augmented"``: the filtered DP samples too; ``"private+augmented"``
    and ``"private+synthetic"`` (kept + augmented): the client's private data as well (``"private+synthetic"``
    was the default before issue 22). FedCoLLM's ``aux_source = "fdkt"`` uses the synthetic part."""
    gen_batch_size: int = 16
    """Prompts per batch of the clients' DP sampling and the LLM's augmentation (template filling: a field
    costs one forward per token of its slowest row, so larger batches need fewer forwards; sampled texts
    depend on the batch, their distribution does not), and of the filter's embedding and scoring."""
    samples_in_report: int = 3

    def __post_init__(self):
        check(self.epsilon > 0, f"epsilon must be > 0 (inf for no noise), got {self.epsilon}")
        for i, e in enumerate(self.client_epsilons):
            check(e > 0, f"client_epsilons[{i}] must be > 0, got {e}")
        check(0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta}")
        check_positive(self, "max_grad_norm", "dp_epochs", "dp_batch_size", "dp_lr", "samples_per_client",
                       "sample_tokens", "question_tokens", "choice_tokens", "temperature", "cluster_size", "filter_batch", "shots", "augment_tokens",
                       "gen_batch_size")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.augment_per_kept >= 0, f"augment_per_kept must be >= 0, got {self.augment_per_kept}")
        check(self.augment_temperature >= 0, f"augment_temperature must be >= 0, got {self.augment_temperature}")
        check(0 < self.filter_keep <= 1, f"filter_keep must be in (0, 1], got {self.filter_keep}")
        check(self.dedup_jaccard > 0, f"dedup_jaccard must be > 0 (above 1: off), got {self.dedup_jaccard}")
        check(self.decontaminate_ngram >= 0, f"decontaminate_ngram must be >= 0 (0: off), got {self.decontaminate_ngram}")
        check(self.filter_min_margin == self.filter_min_margin, "filter_min_margin must be a number (-inf: no bar)")
        check(self.samples_in_report >= 0, f"samples_in_report must be >= 0, got {self.samples_in_report}")
