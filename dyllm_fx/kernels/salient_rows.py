"""Saliency: which rows' attention context moved (``dyllm::saliency``).

For every row n of the new and the cached attention context (B, H, N, d) (heads concatenated,
as in DyLLM) or (B, N, D):

    cos[b, n] = <new, cached> / (max(|new|, eps) * max(|cached|, eps))      fp32, eps = 1e-8

and the *salient* rows are the candidates n in [start, end) (the response tokens) with
cos < tau. They come back as a compact index list without a host sync:

    indices (B, end - start) int64: salient rows in ascending order, then -1 padding
    count   (B,) int64: how many entries of ``indices`` are valid

Two Triton kernels: one program per (batch, block of rows) for the cosines (fp32 accumulation
over heads x d), then one program per batch element that compacts the flags with a block-wise
prefix sum (``tl.cumsum``) carried across blocks, so the order is ascending and deterministic
(no atomics). ``select_salient`` runs the compaction alone on cosines computed elsewhere (e.g.
from ``approx_attention``'s summable statistics, :func:`cosine_from_stats`).
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_pow2, require_triton, tl, triton

EPS = 1e-8


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, 1, N, D); (B, H, N, d) unchanged."""
    if x.dim() == 3:
        return x[:, None]
    if x.dim() != 4:
        raise ValueError(f"context must be (B, N, D) or (B, H, N, d), got {tuple(x.shape)}")
    return x


def check_range(n_rows: int, start: int, end: int) -> None:
    if not 0 <= start <= end <= n_rows:
        raise ValueError(f"candidate range [{start}, {end}) is not within [0, {n_rows}]")


def cosine_from_stats(dot: torch.Tensor, new_sq: torch.Tensor, cached_sq: torch.Tensor, eps: float = EPS):
    """Cosine similarity from the three summable statistics (sum over shards first)."""
    return dot / (new_sq.sqrt().clamp_min(eps) * cached_sq.sqrt().clamp_min(eps))


def row_cosine_reference(new_ctx: torch.Tensor, cached_ctx: torch.Tensor) -> torch.Tensor:
    new, old = _as_rows(new_ctx).float(), _as_rows(cached_ctx).float()
    return cosine_from_stats((new * old).sum((1, 3)), (new * new).sum((1, 3)), (old * old).sum((1, 3)))


def select_salient_reference(cos: torch.Tensor, tau: float, start: int, end: int):
    """(indices, count) of the rows n in [start, end) with cos[b, n] < tau (see module doc)."""
    check_range(cos.shape[1], start, end)
    flag = cos[:, start:end] < tau
    positions = torch.arange(start, end, device=cos.device).expand_as(flag)
    big = torch.iinfo(torch.int64).max
    indices = torch.where(flag, positions, big).sort(dim=1).values
    return indices.masked_fill_(indices == big, -1), flag.sum(1)


def saliency_reference(new_ctx, cached_ctx, tau: float, start: int, end: int):
    cos = row_cosine_reference(new_ctx, cached_ctx)
    indices, count = select_salient_reference(cos, tau, start, end)
    return indices, count, cos


if HAS_TRITON:

    @triton.jit
    def _row_cosine_kernel(
        new_ptr,
        old_ptr,
        cos_ptr,
        sn_b,
        sn_h,
        sn_n,
        sn_d,
        so_b,
        so_h,
        so_n,
        so_d,
        H,
        N,
        D,
        eps,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_r < N
        dot = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        nn = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        oo = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for h in range(0, H):
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + offs_d
                m = row_ok[:, None] & (cols[None, :] < D)
                new_rows = new_ptr + b * sn_b + h * sn_h + offs_r[:, None] * sn_n
                x = tl.load(new_rows + cols[None, :] * sn_d, mask=m, other=0.0)
                old_rows = old_ptr + b * so_b + h * so_h + offs_r[:, None] * so_n
                y = tl.load(old_rows + cols[None, :] * so_d, mask=m, other=0.0)
                x = x.to(tl.float32)
                y = y.to(tl.float32)
                dot += x * y
                nn += x * x
                oo += y * y
        denom = tl.maximum(tl.sqrt(tl.sum(nn, 1)), eps) * tl.maximum(tl.sqrt(tl.sum(oo, 1)), eps)
        tl.store(cos_ptr + b * N + offs_r, tl.sum(dot, 1) / denom, mask=row_ok)

    @triton.jit
    def _compact_kernel(cos_ptr, idx_ptr, count_ptr, N, start, C, tau, BLOCK: tl.constexpr):
        # One program per batch element: ascending compaction by a prefix sum over flag blocks.
        b = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        total = tl.zeros([], tl.int32)
        for c0 in range(0, C, BLOCK):
            slot = c0 + offs
            ok = slot < C
            cos = tl.load(cos_ptr + b * N + start + slot, mask=ok, other=0.0)
            flag = (ok & (cos < tau)).to(tl.int32)
            pos = total + tl.cumsum(flag, 0) - 1
            tl.store(idx_ptr + b * C + pos, (start + slot).to(tl.int64), mask=flag != 0)
            total += tl.sum(flag, 0)
        for c0 in range(0, C, BLOCK):
            slot = c0 + offs
            tl.store(
                idx_ptr + b * C + slot, tl.full([BLOCK], -1, tl.int64), mask=(slot < C) & (slot >= total)
            )
        tl.store(count_ptr + b, total.to(tl.int64))


def triton_row_cosine(new_ctx: torch.Tensor, cached_ctx: torch.Tensor) -> torch.Tensor:
    require_triton(new_ctx)
    new, old = _as_rows(new_ctx), _as_rows(cached_ctx)
    if new.shape != old.shape:
        raise ValueError(f"new {tuple(new.shape)} and cached {tuple(old.shape)} context differ in shape")
    bsz, heads, n_rows, d = new.shape
    cos = torch.empty(bsz, n_rows, dtype=torch.float32, device=new.device)
    if cos.numel() == 0:
        return cos
    block_r = min(32, next_pow2(n_rows))
    block_d = min(128, next_pow2(d))
    _row_cosine_kernel[(bsz, triton.cdiv(n_rows, block_r))](
        new,
        old,
        cos,
        *new.stride(),
        *old.stride(),
        heads,
        n_rows,
        d,
        EPS,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    return cos


def triton_select_salient(cos: torch.Tensor, tau: float, start: int, end: int):
    require_triton(cos)
    check_range(cos.shape[1], start, end)
    cos = cos.float().contiguous()
    bsz, n_cand = cos.shape[0], end - start
    indices = torch.empty(bsz, n_cand, dtype=torch.int64, device=cos.device)
    count = torch.zeros(bsz, dtype=torch.int64, device=cos.device)
    if bsz == 0 or n_cand == 0:
        return indices, count
    block = min(1024, next_pow2(n_cand))
    _compact_kernel[(bsz,)](cos, indices, count, cos.shape[1], start, n_cand, float(tau), BLOCK=block)
    return indices, count


def triton_saliency(new_ctx, cached_ctx, tau: float, start: int, end: int):
    """Triton version of :func:`saliency_reference`: (indices, count, cos)."""
    cos = triton_row_cosine(new_ctx, cached_ctx)
    indices, count = triton_select_salient(cos, tau, start, end)
    return indices, count, cos
