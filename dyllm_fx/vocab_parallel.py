"""Reductions over a vocabulary split across tensor-parallel ranks.

A tensor-parallel model whose LM head is its own (not tied to the embedding) has the head split
over the vocabulary (``passes/tensor_parallel.py``): each rank's logits are the columns
``start .. start + rows - 1`` of the whole vocabulary. What the sampler and the policies read
from logits -- the argmax, the probability of a token, the top probability, the entropy -- is
computed here from per-row values reduced over the ranks (a max, a min, a sum), never from the
gathered logits: one or two scalars per row cross the group instead of the vocabulary.

Every function takes ``shard=None`` for logits that cover the whole vocabulary and then runs the
single-process code unchanged (the token-exact path against the official samplers). The
collectives are torch.distributed's functional ones, graph ops that ``torch.compile`` keeps.

The few choices no reduction gives (Dream's top-p / top-k filters, multinomial draws, the
top-2 margin) gather the logits with :func:`gather_vocab`; the samplers say where.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributed import sum_over_shards


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of a vocabulary split over the ranks of ``group``."""

    start: int  # the vocabulary id of this rank's first column
    rows: int  # columns this rank holds
    total: int  # the whole vocabulary
    group: str  # the process group's name

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.start + self.rows <= self.total:
            last = self.start + self.rows - 1
            raise ValueError(f"columns {self.start}..{last} lie outside a vocabulary of {self.total}")


def _reduce(tensor: torch.Tensor, op: str, group: str) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(tensor, op, group)


def vocab_argmax(scores: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """The vocabulary id of each row's largest score (the first one on ties, as ``argmax``)."""
    if shard is None:
        return scores.argmax(dim=-1)
    best, index = scores.max(dim=-1)
    top = _reduce(best, "max", shard.group)
    # the lowest id among the ranks that hold the top score: argmax's first occurrence
    candidate = torch.where(best == top, index + shard.start, shard.total)
    return _reduce(candidate, "min", shard.group)


def _max_and_sum(logits: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, S) per row in float32: the largest logit over the vocabulary and sum(exp(l - M))."""
    logits = logits.float()
    top = _reduce(logits.amax(dim=-1), "max", shard.group)
    total = sum_over_shards((logits - top[..., None]).exp().sum(dim=-1), shard.group)
    return top, total


def token_probability(logits: torch.Tensor, tokens: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """softmax(logits)[token] per row, in float32 (``tokens`` are vocabulary ids)."""
    if shard is None:
        return torch.softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    top, total = _max_and_sum(logits, shard)
    local = tokens - shard.start
    owned = (local >= 0) & (local < shard.rows)
    picked = logits.float().gather(-1, torch.where(owned, local, 0)[..., None]).squeeze(-1)
    # one rank owns each token: the sum over the ranks is its logit, exactly
    logit = sum_over_shards(torch.where(owned, picked, 0.0), shard.group)
    return (logit - top).exp() / total


def top_probability(logits: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """max softmax(logits) per row, in float32."""
    if shard is None:
        return torch.softmax(logits.float(), dim=-1).amax(dim=-1)
    _, total = _max_and_sum(logits, shard)
    return total.reciprocal()  # exp(M - M) / S


def probs_neg_entropy(probs: torch.Tensor) -> torch.Tensor:
    """sum p log(p + 1e-10) over the last dim (Dream's ``entropy`` confidence)."""
    return (probs * torch.log(probs + 1e-10)).sum(-1)


def neg_entropy(logits: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """:func:`probs_neg_entropy` of softmax(logits) per row, in float32."""
    if shard is None:
        return probs_neg_entropy(torch.softmax(logits.float(), dim=-1))
    top, total = _max_and_sum(logits, shard)
    probs = (logits.float() - top[..., None]).exp() / total[..., None]
    return sum_over_shards(probs_neg_entropy(probs), shard.group)


def uniform_noise(logits: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """float64 uniform noise shaped like the whole vocabulary's logits, this rank's columns:
    every rank draws the whole vocabulary's numbers from the same seed, so a sampled token is
    the one the model in one process would draw."""
    if shard is None:
        return torch.rand_like(logits, dtype=torch.float64)
    noise = torch.rand(*logits.shape[:-1], shard.total, dtype=torch.float64, device=logits.device)
    return noise[..., shard.start : shard.start + shard.rows]


def gather_vocab(logits: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """The whole vocabulary's logits on every rank (for the choices no reduction gives)."""
    if shard is None:
        return logits
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_gather_single(logits.contiguous(), logits.dim() - 1, shard.group)


__all__ = [
    "VocabShard",
    "gather_vocab",
    "neg_entropy",
    "probs_neg_entropy",
    "token_probability",
    "top_probability",
    "uniform_noise",
    "vocab_argmax",
]
