"""Contextual attacks on FedCoT's token-level text DP: what a server with a language model recovers.

The audit in ``fedkt.privacy.audit`` guesses every token alone. A real server has a language model, and
prompts are text: the words around a perturbed token say a lot about the original. Two attacks use that.

**Noisy-channel decoding** (``ChannelModel`` + ``contextual_attack``). The mechanism is public, so the
attacker knows the exact channel ``P(t' | t)`` (the exponential mechanism's probability from the kit). It
searches for the original sequence that maximises

    log P_LM(t_1..t_n) + sum_i log P(t'_i | t_i)

with a left-to-right beam: at position i every beam is extended by the union of (a) the ``top_k``
originals with the highest channel likelihood for the observed token (reverse neighbour lists of the kit,
exact scores) and (b) the ``lm_top`` tokens the LM finds most likely after the beam's prefix; each
candidate is scored with its *exact* channel log-probability (no approximation of the mechanism). All
prompts and beams advance in one batched forward per position with a KV cache. Any causal LM serves as
the prior (the tiny test models, SmolLM2-135M in the measurements).

The attacker is given the perturbed *token ids*. The server receives text; re-tokenising it gives the
same ids whenever the tokenisation of the perturbed text is canonical, so this is at most a small gift.

**Ask the LLM to restore the prompt** (``llm_restore``): an instruction prompt ("some words were replaced
by similar words; write the original text") to a generator, greedy decoding; scored by aligning the
restored tokens with the original ones (``aligned_recovery``: tokens of the original matched in order by
``difflib``, over the original's length).

Metrics (``attack_table``): *token recovery* (fraction of original tokens recovered at their position;
for the restore attack, by alignment) and *exact canary recovery* (fraction of planted canary strings, a
fake patient name and record number per prompt, that appear verbatim in the attacker's reconstruction).
"""

from __future__ import annotations

import difflib
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from fedkt import progress
from fedkt.privacy.audit import map_attack
from fedkt.privacy.text_dp import EmbeddingKit, _tokenize, neighbour_log_weights, sample_replacements

ATTACKS = ("nn1", "map", "contextual", "restore")
RECOMMENDED_MAX_EPSILON = 6.0
"""fedkt's recommended ceiling on FedCoT's ε per token, set from the contextual attack on SmolLM2-135M
(docs/privacy-attacks.md): at ε <= 6 it recovers < 5% of tokens and no canary, and a planted secret's
exposure stays at the no-information level; at ε = 10 it recovers 44% of tokens."""
ATTACK_LABELS = {"nn1": "nearest embedding (NN@1)", "map": "per-token MAP", "contextual": "contextual (LM beam)",
                 "restore": "LLM restore"}
RESTORE_SYSTEM = ("Some words of the text below were replaced by random similar words. Write the original "
                  "text exactly, with the replaced words restored. Answer with the restored text only.")


# ------------------------------------------------------------------------------------------ the channel


class ChannelModel:
    """The mechanism's exact log P(observed | original) at one ε, with reverse neighbour lists to propose
    the originals that best explain an observed token."""

    def __init__(self, kit: EmbeddingKit, epsilon: float):
        self.kit, self.epsilon = kit, float(epsilon)
        self.inf = math.isinf(self.epsilon)
        if self.inf:
            return
        V = kit.vocab_size
        a = self.epsilon * kit.exponent_scale
        _, _, sizes = kit.class_members()
        cls = kit.token_class.long()
        logw_nb = neighbour_log_weights(kit, torch.arange(V), self.epsilon)  # [V, N]
        self.log_z = torch.logaddexp(torch.log(sizes[cls].double()) - a, torch.logsumexp(logw_nb, dim=1))
        self.a = a
        # reverse lists: for every token t', the originals t with t' in N(t) (u > -1) and log P(t' | t)
        valid = (kit.covered[:, None] & (kit.utility > -1)).flatten()
        target = kit.neighbors.long().flatten()[valid]
        src = torch.arange(V)[:, None].expand(V, kit.n_neighbors).flatten()[valid]
        lp = (a * kit.utility.double() - self.log_z[:, None]).flatten()[valid]
        order = torch.argsort(target, stable=True)
        self.rev_src, self.rev_lp = src[order], lp[order]
        self.rev_off = torch.zeros(V + 1, dtype=torch.long)
        self.rev_off[1:] = torch.cumsum(torch.bincount(target, minlength=V), 0)

    def logprob(self, observed: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        """log P(observed | cand) float64, ``observed`` of shape S and ``cands`` of shape S + (M,)."""
        kit = self.kit
        observed = observed.long()
        cands = cands.long()
        obs = observed[..., None].expand_as(cands)
        if self.inf:
            return torch.where(cands == obs, 0.0, -math.inf).double()
        same_class = (kit.token_class[cands] == kit.token_class[obs]) & kit.covered[obs]
        base = -self.a - self.log_z[cands]
        nb = kit.neighbors[cands].long()  # S + (M, N)
        hit = (nb == obs[..., None]) & (kit.utility[cands] > -1) & kit.covered[cands][..., None]
        u = torch.where(hit, kit.utility[cands].double(), -math.inf).amax(-1)
        lp = torch.where(torch.isfinite(u), self.a * u - self.log_z[cands], base)
        return lp.masked_fill(~same_class, -math.inf)

    def top_candidates(self, observed: torch.Tensor, k: int) -> torch.Tensor:
        """[T, k] originals with the highest channel likelihood for each observed token (the observed
        token first at ties; short lists padded by repeating the observed token)."""
        out = observed.long()[:, None].repeat(1, k)
        if self.inf:
            return out
        for i, t in enumerate(observed.tolist()):
            s, e = int(self.rev_off[t]), int(self.rev_off[t + 1])
            if e > s:
                lp = self.rev_lp[s:e]
                j = torch.topk(lp, min(k, e - s)).indices
                out[i, : len(j)] = self.rev_src[s:e][j]
        return out


# ---------------------------------------------------------------------------------- contextual decoding


def start_ids(tok) -> list[int]:
    """The LM prior's context before the first token: the document separator ``<|endoftext|>`` where the
    vocabulary has one (SmolLM2, GPT-2 style), else BOS, else EOS."""
    sep = tok.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tok.get_vocab() else None
    for t in (sep, tok.bos_token_id, tok.eos_token_id):
        if t is not None:
            return [int(t)]
    raise ValueError("the attacker's tokenizer has neither a BOS nor an EOS token to start the LM prior")


@torch.no_grad()
def contextual_attack(model, tok, kit: EmbeddingKit, observed: Sequence[Sequence[int]], epsilon: float,
                      beam: int = 4, top_k: int = 16, lm_top: int = 16, lm_weight: float = 1.0,
                      batch_prompts: int = 32) -> list[list[int]]:
    """Noisy-channel beam decoding of every observed (perturbed) token sequence; returns the guessed
    originals, position for position. ``lm_weight = 0`` turns the prior off (then it is the per-token MAP
    among the proposed candidates)."""
    if beam < 1 or top_k < 1 or lm_top < 0:
        raise ValueError(f"beam and top_k must be >= 1 and lm_top >= 0, got {beam}, {top_k}, {lm_top}")

    ch = ChannelModel(kit, epsilon)
    out: list[list[int]] = []
    chunks = [[list(x) for x in observed[s: s + batch_prompts]] for s in range(0, len(observed), batch_prompts)]
    with progress.bar(f"contextual attack ε={epsilon:g} (positions)",
                      sum(max((len(x) for x in c), default=0) for c in chunks)) as pb:
        for chunk in chunks:
            out += _decode_batch(model, tok, ch, chunk, beam, top_k, lm_top, lm_weight, tick=pb.advance)
    return out


def _decode_batch(model, tok, ch: ChannelModel, obs: list[list[int]], B: int, K: int, M: int, w: float,
                  tick=lambda: None):
    P = len(obs)
    L = max((len(x) for x in obs), default=0)
    if L == 0:
        return [[] for _ in obs]
    lengths = torch.tensor([len(x) for x in obs])
    obs_t = torch.zeros(P, L, dtype=torch.long)
    for p, x in enumerate(obs):
        obs_t[p, : len(x)] = torch.tensor(x, dtype=torch.long)
    flat_obs = torch.cat([torch.tensor(x, dtype=torch.long) for x in obs if x])
    chan = ch.top_candidates(flat_obs, K)  # [sum len, K]
    chan_t = torch.zeros(P, L, K, dtype=torch.long)
    i = 0
    for p, x in enumerate(obs):
        chan_t[p, : len(x)] = chan[i: i + len(x)]
        i += len(x)
    device = next(model.parameters()).device
    start = torch.tensor(start_ids(tok) * P, dtype=torch.long).view(P, 1)
    res = model(input_ids=start.to(device), use_cache=True)
    cache = res.past_key_values
    logits = res.logits[:, -1].float().cpu()  # [P, V]
    cache.reorder_cache(torch.arange(P).repeat_interleave(B).to(device))  # rows p*B + b
    logits = logits.repeat_interleave(B, 0)
    score = torch.full((P, B), -math.inf, dtype=torch.float64)
    score[:, 0] = 0.0
    hist = torch.zeros(P, B, 0, dtype=torch.long)
    V = logits.shape[-1]
    for pos in range(L):
        if V > ch.kit.vocab_size:  # rows past the kit (padding rows of the LM head) are never originals
            logits[:, ch.kit.vocab_size:] = -math.inf
        lp_lm = torch.log_softmax(logits, -1).double().view(P, B, V)
        c_ch = chan_t[:, pos][:, None, :].expand(P, B, K)
        if M:
            c_lm = torch.topk(lp_lm, M, dim=-1).indices
            cands = torch.cat([c_ch, c_lm], -1)
        else:
            cands = c_ch
        lp_ch = ch.logprob(obs_t[:, pos][:, None].expand(P, B), cands)  # [P, B, K+M]
        prior = torch.gather(lp_lm, -1, cands)
        # a token proposed twice for the same beam counts once
        dup = (cands[..., :, None] == cands[..., None, :]).tril(-1).any(-1)
        total = score[..., None] + w * prior + lp_ch
        total = total.masked_fill(dup, -math.inf)
        best = torch.topk(total.view(P, -1), B, dim=-1)
        b_idx = best.indices // cands.shape[-1]
        tok_new = torch.gather(cands.reshape(P, -1), 1, best.indices)
        active = pos < lengths  # finished prompts keep their beams unchanged
        keep = torch.arange(B)[None].expand(P, B)
        b_idx = torch.where(active[:, None], b_idx, keep)
        new_score = torch.where(active[:, None], best.values, score)
        hist = torch.cat([torch.gather(hist, 1, b_idx[..., None].expand_as(hist)),
                          torch.where(active[:, None], tok_new, 0)[..., None]], -1)
        score = new_score
        tick()
        if pos + 1 == L:
            break
        rows = (torch.arange(P)[:, None] * B + b_idx).flatten()
        cache.reorder_cache(rows.to(device))
        res = model(input_ids=hist[:, :, -1].reshape(P * B, 1).to(device), past_key_values=cache, use_cache=True)
        cache = res.past_key_values
        logits = res.logits[:, -1].float().cpu()
    best_b = score.argmax(-1)
    return [hist[p, int(best_b[p]), : len(obs[p])].tolist() for p in range(P)]


# ------------------------------------------------------------------------------------------ LLM restore


def llm_restore(generator, perturbed_texts: Sequence[str], max_new_tokens: int = 160) -> list[str]:
    """Greedy restoration of each perturbed prompt by a text generator (``fedkt.text_generators``)."""
    prompts = [generator.chat_prompt(RESTORE_SYSTEM, t) for t in perturbed_texts]
    stop = ["\n\n", "<|im_end|>", "<|endoftext|>"]
    return [o.strip() for o in generator.generate(prompts, max_new_tokens=max_new_tokens, stop=stop)]


def aligned_recovery(original: Sequence[int], guess: Sequence[int]) -> int:
    """Original tokens matched in order by the guess (difflib matching blocks; no junk heuristic)."""
    sm = difflib.SequenceMatcher(None, list(original), list(guess), autojunk=False)
    return sum(b.size for b in sm.get_matching_blocks())


# ------------------------------------------------------------------------------------------- canaries

_FIRST = ("Mira", "Tomasz", "Ingrid", "Kwame", "Lucia", "Dmitri", "Aiko", "Rafael", "Signe", "Omar", "Beatriz",
          "Henrik", "Zanele", "Pavel", "Noor", "Esteban")
_LAST = ("Okonkwo", "Zabrowski", "Lindqvist", "Haddad", "Moreau", "Takahashi", "Castellano", "Petrenko",
         "Abernathy", "Vasquez", "Nakamura", "Oyelaran", "Kowalczyk", "Brannigan", "Delacroix", "Szabo")


def make_canaries(n: int, seed: int) -> list[str]:
    """n fake patient canaries "Name Surname, record NNNN" (seeded; names and numbers drawn at random)."""
    rng = random.Random(seed)
    return [f"{rng.choice(_FIRST)} {rng.choice(_LAST)}, record {rng.randrange(1000, 10000)}" for _ in range(n)]


def plant(texts: Sequence[str], canaries: Sequence[str]) -> list[str]:
    """Put canary i into text i: "Patient <canary> asks: <text>" (a private detail in a client prompt)."""
    if len(canaries) != len(texts):
        raise ValueError(f"{len(canaries)} canaries for {len(texts)} texts: plant one per text")
    return [f"Patient {c} asks: {t}" for c, t in zip(canaries, texts)]


# ----------------------------------------------------------------------------------------------- table


@dataclass
class AttackSetting:
    beam: int = 4
    top_k: int = 16
    lm_top: int = 16
    restore: bool = True
    restore_tokens: int = 0  # 0: original length + 16


def attack_table(texts: Sequence[str], canaries: Sequence[str], kit: EmbeddingKit, tok, model,
                 epsilons: Sequence[float] = (1, 3, 6, 10, math.inf), seed: int = 0,
                 setting: AttackSetting | None = None, generator=None) -> list[dict[str, Any]]:
    """Perturb the (canary-planted) texts at each ε and run every attack; one row per ε with
    ``token_recovery`` and ``canary_recovery`` dicts keyed by attack (``ATTACKS``). ``generator`` (a
    ``fedkt.text_generators`` text generator) enables the restore attack."""
    st = setting or AttackSetting()
    ids = _tokenize(tok, texts)
    flat = torch.tensor([i for x in ids for i in x], dtype=torch.long)
    lens = [len(x) for x in ids]
    n = max(1, len(flat))
    rows = []
    for j, eps in enumerate(epsilons):
        eps = float(eps)
        new = sample_replacements(flat, kit, eps, torch.Generator().manual_seed(seed * 1000 + j))
        obs = [x.tolist() for x in new.split(lens)]
        guesses = {"nn1": obs, "map": [x.tolist() for x in map_attack(kit, new, eps).split(lens)],
                   "contextual": contextual_attack(model, tok, kit, obs, eps, beam=st.beam, top_k=st.top_k,
                                                   lm_top=st.lm_top)}
        tok_rec = {a: sum(int((torch.tensor(g) == torch.tensor(o)).sum()) for g, o in zip(gs, ids) if o) / n
                   for a, gs in guesses.items()}
        recon = {a: tok.batch_decode(gs, clean_up_tokenization_spaces=False) for a, gs in guesses.items()}
        if generator is not None and st.restore:
            perturbed = tok.batch_decode(obs, clean_up_tokenization_spaces=False)
            budget = st.restore_tokens or (max(lens, default=0) + 16)
            restored = llm_restore(generator, perturbed, max_new_tokens=budget)
            r_ids = _tokenize(tok, restored)
            tok_rec["restore"] = sum(aligned_recovery(o, g) for o, g in zip(ids, r_ids)) / n
            recon["restore"] = restored
        can_rec = {a: sum(c in r for c, r in zip(canaries, rs)) / max(1, len(canaries)) for a, rs in recon.items()}
        rows.append({"epsilon": eps, "n_texts": len(ids), "n_tokens": int(len(flat)),
                     "token_recovery": tok_rec, "canary_recovery": can_rec,
                     "setting": {"beam": st.beam, "top_k": st.top_k, "lm_top": st.lm_top}})
    return rows


def attack_sample(model, tok, kit: EmbeddingKit, texts: Sequence[str], epsilons: Sequence[float], seed: int = 0,
                  beam: int = 2, top_k: int = 8, lm_top: int = 8) -> list[dict[str, Any]]:
    """The cheap version for every FedCoT run's privacy section: a few public prompts with planted
    canaries, a short beam, no restore. The model's training mode and the global RNG are left as found
    (the attack is deterministic given ``seed``, and the run's training numbers do not move)."""
    if not texts:
        return []
    canaries = make_canaries(len(texts), seed)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng():
            return attack_table(plant(texts, canaries), canaries, kit, tok, model, epsilons, seed=seed,
                                setting=AttackSetting(beam=beam, top_k=top_k, lm_top=lm_top, restore=False))
    finally:
        model.train(was_training)


def _fmt_eps(e: float) -> str:
    return "∞" if math.isinf(e) else f"{e:g}"


def render_attack_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: ε × attack → token recovery / exact canary recovery (percent)."""
    attacks = [a for a in ATTACKS if rows and a in rows[0]["token_recovery"]]
    head = "| ε per token | " + " | ".join(f"{ATTACK_LABELS[a]}: tokens / canaries" for a in attacks) + " |"
    lines = [head, "|" + "---|" * (len(attacks) + 1)]
    for r in rows:
        cells = [f"{100 * r['token_recovery'][a]:.1f}% / {100 * r['canary_recovery'][a]:.0f}%" for a in attacks]
        lines.append(f"| {_fmt_eps(r['epsilon'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
