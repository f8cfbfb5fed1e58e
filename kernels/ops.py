"""The custom ops the compiler inserts, as ``torch.library`` ops in the ``dyllm`` namespace.

Each op has a plain-torch implementation (the reference, and the production path on CPU) and
a fake implementation so torch.compile / torch.export / make_fx can trace through it. The
Triton kernels (kernels issue) register under the same names for CUDA.

Row sets are ``rows`` tensors of shape (B, A), int64: for each batch element the A sequence
positions that are *active* this step. Padding a row set with repeats of one of its indices is
allowed: duplicated rows compute identical values, so the duplicated writes are idempotent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _row_index(rows: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Expand (B, A) row indices to an index tensor for gather/scatter along ``dim`` of ``like``."""
    shape = [1] * like.dim()
    shape[0], shape[dim] = rows.shape[0], rows.shape[1]
    target = list(like.shape)
    target[0], target[dim] = rows.shape[0], rows.shape[1]
    return rows.view(shape).expand(target)


def gather_rows(x: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """x[b, ..., rows[b, a], ...] along ``dim``; a batch-1 table is broadcast to the rows' batch."""
    if x.shape[0] != rows.shape[0]:
        x = x.expand(rows.shape[0], *x.shape[1:])
    return x.gather(dim, _row_index(rows, x, dim))


@torch.library.custom_op("dyllm::cache_write_rows", mutates_args=("cache",))
def cache_write_rows(cache: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, dim: int) -> None:
    """cache[b, ..., rows[b, a], ...] = values[b, ..., a, ...] along ``dim`` (in place)."""
    cache.scatter_(dim, _row_index(rows, values, dim), values)


@cache_write_rows.register_fake
def _(cache, rows, values, dim):
    return None


@torch.library.custom_op("dyllm::partial_attention", mutates_args=())
def partial_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Attention of the active rows' queries over every cached key.

    q (B, H, A, d) for the rows in ``rows``; k_cache/v_cache (B, KV, L, d) with H % KV == 0;
    ``mask`` broadcastable to (B, H, Lq, L) with Lq either 1 (a key padding mask) or L (a full
    query x key mask, whose query rows are gathered here). Bidirectional: no causal mask.
    """
    if mask is not None and mask.dim() == 4 and mask.shape[-2] != 1:
        mask = gather_rows(mask, rows, 2)
    out = F.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k_cache.shape[1]
    )
    # SDPA's output layout differs by backend; the op promises a contiguous tensor (as its
    # fake implementation says), so compiled graphs can rely on the strides.
    return out.contiguous()


@partial_attention.register_fake
def _(q, k_cache, v_cache, rows, mask, scale):
    return q.new_empty(q.shape[:-1] + (v_cache.shape[-1],))
