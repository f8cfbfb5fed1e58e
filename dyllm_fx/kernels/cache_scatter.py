"""Row gather / scatter between a cache and the active rows (``dyllm::cache_write_rows``).

    cache[b, ..., rows[b, a], ...] = values[b, ..., a, ...]     along ``dim``

Layouts: K/V caches (B, KV, L, d) with ``dim=2``; hidden states (B, L, D) with ``dim=1``. Both
are the same kernel: the cache is seen as (B, P, L, Q) with P the product of the dimensions
before ``dim`` and Q the product of those after it.

Row indices outside [0, L) are skipped by the Triton kernel (the reference raises). Repeated
rows are allowed when they carry identical values (the row-set padding convention of
``kernels/dispatch.py``), since the duplicated writes are then idempotent.
"""

from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, next_pow2, require_triton, tl, triton


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


def _put_index(cache: torch.Tensor, rows: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    """Advanced-indexing tensors that address cache[b, i1, ..., rows[b, a]] for every b, the
    full range of each dimension before ``dim``, and a; they broadcast to (B, d1, ..., A)."""
    n = dim + 1
    index = []
    for d in range(dim):
        shape = [1] * n
        shape[d] = cache.shape[d] if d else rows.shape[0]
        index.append(torch.arange(shape[d], device=rows.device).view(shape))
    shape = [1] * n
    shape[0], shape[dim] = rows.shape
    index.append(rows.view(shape))
    return tuple(index)


def cache_write_rows_reference(
    cache: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, dim: int
) -> None:
    """The plain-torch write (the CPU path of ``dyllm::cache_write_rows``). ``index_put_``, not
    ``scatter_``: inductor turns a functionalised ``index_put`` back into an in-place write of
    the cache, where a ``scatter`` would copy the whole cache twice."""
    cache.index_put_(_put_index(cache, rows, dim % cache.dim()), values)


if HAS_TRITON:

    @triton.jit
    def _scatter_rows_kernel(
        cache_ptr,
        values_ptr,
        rows_ptr,
        P,
        L,
        A,
        Q,
        BLOCK_Q: tl.constexpr,
    ):
        # grid: (B * A, P, cdiv(Q, BLOCK_Q)); cache (B, P, L, Q) and values (B, P, A, Q) contiguous.
        ba = tl.program_id(0)
        p = tl.program_id(1)
        qb = tl.program_id(2)
        b = ba // A
        a = ba % A
        row = tl.load(rows_ptr + ba).to(tl.int64)
        cols = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        # An out-of-range row writes nothing (the row test folded into the column limit).
        limit = tl.where((row >= 0) & (row < L), Q, 0)
        m = cols < limit
        src = values_ptr + ((b.to(tl.int64) * P + p) * A + a) * Q + cols
        dst = cache_ptr + ((b.to(tl.int64) * P + p) * L + row) * Q + cols
        tl.store(dst, tl.load(src, mask=m), mask=m)


def triton_cache_write_rows(cache: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, dim: int) -> None:
    """Triton version of :func:`cache_write_rows_reference` (in place on ``cache``).

    Needs a contiguous cache (it is written in place, so it cannot be copied); anything else
    falls back to the reference.
    """
    require_triton(cache)
    dim = dim % cache.dim()
    expected = list(cache.shape)
    expected[dim] = rows.shape[1]
    if (
        not cache.is_contiguous()
        or dim == 0
        or values.dtype != cache.dtype
        or rows.shape[0] != cache.shape[0]
        or list(values.shape) != expected
    ):
        cache_write_rows_reference(cache, rows, values, dim)
        return
    bsz, n_rows = rows.shape
    if bsz == 0 or n_rows == 0 or cache.numel() == 0:
        return
    p = math.prod(cache.shape[1:dim])
    q = math.prod(cache.shape[dim + 1 :])
    values = values.contiguous()
    rows = rows.to(torch.int64).contiguous()
    block_q = min(next_pow2(q, 16), 1024)
    grid = (bsz * n_rows, p, triton.cdiv(q, block_q))
    _scatter_rows_kernel[grid](cache, values, rows, p, cache.shape[dim], n_rows, q, BLOCK_Q=block_q)
