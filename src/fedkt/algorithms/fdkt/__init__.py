"""FDKT: federated domain knowledge transfer through differentially private synthetic data (Li et al.,
arXiv 2405.14212), for any causal LM fedkt loads, many clients, end to end.

The protocol (one shot; each client k with its own ε_k and seed):
  1. synthesize (client): DP-SGD fine-tuning of the SLM's LoRA adapter on the private examples, rendered
     as "write a question" tasks (``generation_text``: a topic + answer-letter prefix, then the example in
     the ``render_mc`` template), through Opacus (``fedkt.privacy.dp_sgd``; target ε_k, δ = min(δ, 1/n²)).
     The DP model then samples ``samples_per_client`` examples conditioned on the same kind of prefix (the
     topics and letters follow a public schedule, so even *which* prefixes are used reveals nothing), the
     samples are parsed and malformed ones dropped. Only the parsed samples, their counts and the public
     privacy figures (ε spent by the accountant for the steps taken, δ, σ, q, steps) leave the client;
     the DP adapter stays in the client's state.
  2. filter (server): drop near-duplicates and samples sharing an n-gram with an evaluation question
     (``quality``), embed the samples (mean-pooled LLM hidden states), k-means them, let the LLM pick the
     eligible samples of each cluster (``filter_augment``; the scored filter with a quality bar), and let
     it re-answer the kept ones (``quality.check_answers``).
  3. augment (server): few-shot prompts from the kept samples; the LLM writes new examples (each task's
     own number of choices); they are validated, de-duplicated and checked for contamination.
  4. train (client): each client fine-tunes its SLM's LoRA on ``synthetic_set`` (default: the augmented
     examples only, as the paper; or with the kept samples and/or its private data) and evaluates it
     locally, exactly like the standalone baseline (same seed, same epochs = ``train.epochs ×
     federation.rounds``): FDKT vs Standalone is a paired comparison, and with private data and an empty
     synthetic set the two are equal bit for bit (tested). Only metrics leave the client.

Privacy: everything after DP training is post-processing of the DP adapter (sampling, parsing, the
server's filter and augmentation, the final training's use of the synthetic set), so the synthetic set,
and anything derived from it alone, carries client k's (ε_k, δ_k). The final SLM is trained on private
data too and is never sent (only its test metrics, as in Standalone).

Rounds: FDKT is one-shot, as in the paper (no adapter is ever averaged: averaging adapters trained
on private data without DP would void the privacy argument). ``federation.rounds`` only scales the
local training epochs, as for Standalone. A resumed run re-uses the synthetic set saved after step 3
(``fdkt/synthetic.json`` in the run directory), and a client asked again returns its stored samples:
no ε is spent twice.

For FedCoLLM without public data (``fedcollm.aux_source = "fdkt"``), :func:`synthesize` runs steps 1–3
and its examples become the server's auxiliary set (``CLIENT_HANDLERS`` are among that method's client
handlers).

Modules, in the order of the protocol: ``config`` (the ``[fdkt]`` section), ``samples`` (the public
prefix, sampling plan and sample key both sides share), ``client`` (steps 1 and 4), ``server``
(:func:`synthesize` = steps 1–3, :func:`run`), ``filter_augment`` (the LLM's steps 2 and 3), ``quality``
(answers, near-duplicates, contamination), ``report``.
"""

from __future__ import annotations

from fedkt.algorithms.fdkt.client import CLIENT_HANDLERS, HANDLERS, PUBLIC_DP_FIELDS, client_synthesize, sample_generations
from fedkt.algorithms.fdkt.config import FDKTConfig
from fedkt.algorithms.fdkt.report import report_section
from fedkt.algorithms.fdkt.samples import generation_text, sampling_plan, synth_prefix
from fedkt.algorithms.fdkt.server import FDKT, Synthesis, filter_mode, run, synthesize

__all__ = ["CLIENT_HANDLERS", "FDKT", "FDKTConfig", "HANDLERS", "PUBLIC_DP_FIELDS", "Synthesis", "client_synthesize",
           "filter_mode", "generation_text", "report_section", "run", "sample_generations", "sampling_plan",
           "synth_prefix", "synthesize"]
