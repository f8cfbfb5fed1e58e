"""Saliency: how far each row's attention context moved, from summable statistics.

DyLLM calls a row *salient* when the cosine similarity of its new attention context to the
cached one (heads concatenated) is below tau:

    cos[b, n] = <new, cached> / (max(|new|, eps) * max(|cached|, eps))      fp32, eps = 1e-8

``approx_attention`` returns the three sums per row ([<new, cached>, |new|^2, |cached|^2], over
its heads), so the cosine needs no second pass over the contexts, and the shards of a
tensor-parallel model add their sums up before taking it. The policy picks its salient rows from
these cosines inside the step (top-C), so no standalone saliency op or kernel is needed.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def cosine_from_stats(dot: torch.Tensor, new_sq: torch.Tensor, cached_sq: torch.Tensor, eps: float = EPS):
    """Cosine similarity from the three summable statistics (sum over shards first)."""
    return dot / (new_sq.sqrt().clamp_min(eps) * cached_sq.sqrt().clamp_min(eps))
