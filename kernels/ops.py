"""The custom ops the compiler inserts, as ``torch.library`` ops in the ``dyllm`` namespace.

Each op has a plain-torch implementation (the production path on CPU) and a fake implementation
so torch.compile / torch.export / make_fx can trace through it. The kernels live one per file
beside their references (``cache_scatter``, ``partial_attention``, ``saliency``,
``approx_attention``; ``gathered_mlp`` documents why the projections stay in torch); this module
is where they are registered.

Registration: each op is a ``torch.library.custom_op`` whose default implementation (every
device) is plain torch: the reference, except for ``partial_attention_stats`` and
``approx_attention``, whose default is a lean version beside the reference (``*_fast``: the same
fp32 quantities in fewer, larger torch ops, about 2x faster on CPU at decoding shapes; the
``*_reference`` functions stay the tests' oracle; ``partial_attention_stats``'s output equals
``partial_attention``'s up to float rounding, see ``STATS_OUT_FROM_SDPA``). ``partial_attention``
stays SDPA (a one-pass version is no faster on CPU, and SDPA keeps the transformed model's dense
steps equal to the original's). When Triton imports (and ``DYLLM_TRITON=0`` is not set), ``register_kernel("cuda")``
points CUDA tensors at the Triton launcher. We do not use ``torch.library.triton_op``: a
triton_op has one implementation for all devices, which Inductor traces *into* (the Triton
kernel becomes part of the compiled graph), so CPU tensors would reach a Triton launch; and it
would replace the op the passes insert by its kernels in exported graphs. A custom op with
per-device kernels keeps one opaque ``dyllm::`` node for torch.compile / torch.export (shapes
from the fake impl), plain torch on CPU and Triton on CUDA. To run a Triton kernel on CPU
tensors (tests, with TRITON_INTERPRET=1) call the module's ``triton_*`` launcher directly.

Row sets are ``rows`` tensors of shape (B, A), int64: for each batch element the A sequence
positions that are *active* this step. Padding a row set with repeats of one of its indices is
allowed: duplicated rows compute identical values, so the duplicated writes are idempotent.
"""

from __future__ import annotations

import torch

from ._triton import CUDA_KERNELS_ENABLED, HAS_TRITON
from .approx_attention import approx_attention_fast, triton_approx_attention
from .cache_scatter import cache_write_rows_reference, gather_rows, triton_cache_write_rows
from .partial_attention import (
    partial_attention_reference,
    partial_attention_stats_fast,
    triton_partial_attention,
)
from .saliency import saliency_reference, triton_saliency

__all__ = [
    "approx_attention", "cache_write_rows", "gather_rows", "partial_attention", "partial_attention_stats", "saliency",
]


@torch.library.custom_op("dyllm::cache_write_rows", mutates_args=("cache",))
def cache_write_rows(cache: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, dim: int) -> None:
    """cache[b, ..., rows[b, a], ...] = values[b, ..., a, ...] along ``dim`` (in place)."""
    cache_write_rows_reference(cache, rows, values, dim)


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
    ``scale`` None: 1/sqrt(d).
    """
    return partial_attention_reference(q, k_cache, v_cache, rows, mask, scale)


@partial_attention.register_fake
def _(q, k_cache, v_cache, rows, mask, scale):
    return q.new_empty(q.shape[:-1] + (v_cache.shape[-1],))


@torch.library.custom_op("dyllm::partial_attention_stats", mutates_args=())
def partial_attention_stats(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``partial_attention`` plus its fp32 softmax statistics per query row: (out, m, l) with
    m (B, H, A) the row max of the scaled, masked scores and l = sum exp(s - m) (natural log)."""
    return partial_attention_stats_fast(q, k_cache, v_cache, rows, mask, scale)


@partial_attention_stats.register_fake
def _(q, k_cache, v_cache, rows, mask, scale):
    out = q.new_empty(q.shape[:-1] + (v_cache.shape[-1],))
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("dyllm::saliency", mutates_args=())
def saliency(
    new_ctx: torch.Tensor, cached_ctx: torch.Tensor, tau: float, start: int, end: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows in [start, end) whose context moved: cos(new, cached) < tau, per row over all heads.

    Contexts (B, H, N, d) or (B, N, D). Returns (indices (B, end - start) int64, ascending, -1
    padded; count (B,) int64; cos (B, N) fp32). See ``kernels/saliency.py``.
    """
    return saliency_reference(new_ctx, cached_ctx, tau, start, end)


@saliency.register_fake
def _(new_ctx, cached_ctx, tau, start, end):
    bsz, n_rows = new_ctx.shape[0], new_ctx.shape[-2]
    return (
        new_ctx.new_empty((bsz, end - start), dtype=torch.int64),
        new_ctx.new_empty((bsz,), dtype=torch.int64),
        new_ctx.new_empty((bsz, n_rows), dtype=torch.float32),
    )


@torch.library.custom_op("dyllm::approx_attention", mutates_args=())
def approx_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    changed: torch.Tensor,
    dv_rows: torch.Tensor,
    cached_ctx: torch.Tensor,
    salient_rows: torch.Tensor,
    salient_ctx: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    k_old_rows: torch.Tensor | None = None,
    m_old: torch.Tensor | None = None,
    l_old: torch.Tensor | None = None,
    q_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DyLLM's approximate attention with saliency: every row's context = cached context +
    P[:, changed] . dV, salient rows exact; returns (ctx, stats (B, N, 3), m, l). Mode 2 (cached
    softmax statistics) when m_old / l_old / k_old_rows are given; q may cover only the rows
    [q_start, q_start + Nq). See ``kernels/approx_attention.py``.
    """
    return approx_attention_fast(
        q, k, changed, dv_rows, cached_ctx, salient_rows, salient_ctx, mask, scale, k_old_rows, m_old, l_old, q_start
    )


@approx_attention.register_fake
def _(
    q, k, changed, dv_rows, cached_ctx, salient_rows, salient_ctx, mask, scale, k_old_rows=None, m_old=None, l_old=None,
    q_start=0,
):
    bsz, heads, n_rows = q.shape[:3]
    return (
        cached_ctx.new_empty(cached_ctx.shape),
        q.new_empty((bsz, n_rows, 3), dtype=torch.float32),
        q.new_empty((bsz, heads, n_rows), dtype=torch.float32),
        q.new_empty((bsz, heads, n_rows), dtype=torch.float32),
    )


if HAS_TRITON and CUDA_KERNELS_ENABLED:
    cache_write_rows.register_kernel("cuda")(triton_cache_write_rows)

    @partial_attention.register_kernel("cuda")
    def _(q, k_cache, v_cache, rows, mask, scale):
        return triton_partial_attention(q, k_cache, v_cache, rows, mask, scale)

    @partial_attention_stats.register_kernel("cuda")
    def _(q, k_cache, v_cache, rows, mask, scale):
        return triton_partial_attention(q, k_cache, v_cache, rows, mask, scale, return_stats=True)

    saliency.register_kernel("cuda")(triton_saliency)
    approx_attention.register_kernel("cuda")(triton_approx_attention)
