"""Token-level sampling math shared by the samplers (written from the LLaDA and Dream papers'
reference generation code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..vocab_parallel import (
    VocabShard,
    gather_vocab,
    neg_entropy,
    probs_neg_entropy,
    top_probability,
    uniform_noise,
    vocab_argmax,
)


def add_gumbel_noise(
    logits: torch.Tensor, temperature: float, shard: VocabShard | None = None
) -> torch.Tensor:
    """LLaDA's temperature sampling: argmax of exp(logits) / (-log u)^T equals a Gumbel-max draw.

    Done in float64 because in low precision the perturbed scores collapse and ties replace
    sampling (the LLaDA authors note this degrades quality). ``shard``: the logits are this slice
    of the vocabulary; the noise is the whole vocabulary's, sliced alike.
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = uniform_noise(logits, shard)
    return logits.exp() / (-torch.log(noise)) ** temperature


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits per row; the rest become the dtype's minimum."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest prefix of sorted tokens whose mass reaches ``top_p``."""
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = F.softmax(sorted_logits, dim=-1).cumsum(-1)
    # Drop a token when the mass *before* it already exceeds top_p; the best token always stays.
    drop_sorted = (cumulative - F.softmax(sorted_logits, dim=-1)) > top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def dream_sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    confidence: str = "prob",
    shard: VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's ``sample_tokens``: (confidence, token) per row of ``logits`` (N, V).

    ``confidence``: "prob" (probability of the chosen token: maskgit_plus), "margin"
    (top1 - top2 probability: topk_margin) or "neg_entropy" (entropy). ``shard``: the logits
    are this slice of the vocabulary; a greedy choice by "prob" or "neg_entropy" is reduced over
    the ranks, anything else (sampling, filters, the margin) gathers the whole vocabulary first.
    """
    if confidence not in ("prob", "margin", "neg_entropy"):
        raise ValueError(f"unknown confidence {confidence!r}; use 'prob', 'margin' or 'neg_entropy'")
    filtered = (top_p is not None and top_p < 1) or top_k is not None
    if shard is not None and (temperature > 0 or filtered or confidence == "margin"):
        logits, shard = gather_vocab(logits, shard), None
    if shard is not None:
        tokens = vocab_argmax(logits, shard)
        if confidence == "prob":
            return top_probability(logits, shard), tokens
        return neg_entropy(logits, shard), tokens
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    probs = torch.softmax(logits.float(), dim=-1)
    if temperature > 0:
        tokens = torch.multinomial(probs, 1).squeeze(-1)
        conf = probs.gather(-1, tokens[:, None]).squeeze(-1)
    else:
        conf, tokens = probs.max(dim=-1)
    if confidence == "margin":
        top2 = probs.topk(2, dim=-1).values
        conf = top2[:, 0] - top2[:, 1]
    elif confidence == "neg_entropy":
        conf = probs_neg_entropy(probs)
    return conf, tokens
