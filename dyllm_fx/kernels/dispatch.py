"""The ops the compiler and the runtime call, and the one table that says what runs them.

Each op has a plain-torch implementation and, where one exists, a Triton kernel:

    op                        plain torch (CPU, and traced graphs on CPU)    Triton (CUDA)
    cache_write_rows          cache_write_rows_reference                      triton_cache_write_rows
    partial_attention         partial_attention_reference (SDPA)              triton_partial_attention
    partial_attention_stats   partial_attention_stats_fast                    triton_partial_attention
    approx_attention          approx_attention_fast                           triton_approx_attention

The runtime and the passes call the functions at the bottom of this module. For a CUDA tensor
(with Triton present and ``DYLLM_TRITON`` not 0) a function calls the registered
``torch.ops.dyllm.*`` op, which runs the Triton kernel and shows torch.compile / torch.export
one opaque node with a fake implementation. For anything else it calls the plain-torch
implementation directly: no custom-op dispatch in eager code (it costs as much as a small op's
work on the CPU), and traced graphs on the CPU see standard aten ops that inductor fuses and
ONNX exports. Which branch is taken depends on the device only, so it is fixed when a graph is
traced.

The ``*_reference`` functions are the tests' oracle; ``partial_attention_stats_fast`` and
``approx_attention_fast`` compute the same fp32 quantities in fewer torch ops. We do not use
``torch.library.triton_op``: it has one implementation for every device, which inductor traces
into, so CPU tensors would reach a Triton launch.

Row sets are ``rows`` tensors of shape (B, A), int64: for each batch element the A sequence
positions that are *active* this step. Padding a row set with repeats of one of its indices is
allowed: duplicated rows compute identical values, so the duplicated writes are idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ._triton import CUDA_KERNELS_ENABLED, HAS_TRITON
from .approx_attention import approx_attention_fast, triton_approx_attention
from .cache_scatter import cache_write_rows_reference, gather_rows, triton_cache_write_rows
from .partial_attention import (
    partial_attention_reference,
    partial_attention_stats_fast,
    triton_partial_attention,
)

__all__ = [
    "KERNELS",
    "approx_attention",
    "cache_write_rows",
    "gather_rows",
    "partial_attention",
    "partial_attention_stats",
]


@dataclass(frozen=True)
class Kernel:
    """The implementations of one op: plain torch for every device, Triton for CUDA."""

    torch_impl: Callable
    triton_impl: Callable


def _triton_stats(q, k_cache, v_cache, rows, mask, scale):
    return triton_partial_attention(q, k_cache, v_cache, rows, mask, scale, return_stats=True)


KERNELS: dict[str, Kernel] = {
    "cache_write_rows": Kernel(cache_write_rows_reference, triton_cache_write_rows),
    "partial_attention": Kernel(partial_attention_reference, triton_partial_attention),
    "partial_attention_stats": Kernel(partial_attention_stats_fast, _triton_stats),
    "approx_attention": Kernel(approx_attention_fast, triton_approx_attention),
}


# --- the registered torch.library ops (their default implementation is the table's torch one)


def _register(name: str, mutates_args: tuple[str, ...] = ()):
    """Register ``dyllm::<name>`` from a typed stub, which gives the op its schema and its doc;
    the table's torch implementation is the op's default (the Triton one is registered for CUDA
    below)."""

    def register(signature: Callable):
        schema = torch.library.infer_schema(signature, mutates_args=mutates_args)
        op = torch.library.custom_op(
            f"dyllm::{name}", KERNELS[name].torch_impl, mutates_args=mutates_args, schema=schema
        )
        op.__doc__ = signature.__doc__
        return op

    return register


@_register("cache_write_rows", mutates_args=("cache",))
def _cache_write_rows_op(cache: Tensor, rows: Tensor, values: Tensor, dim: int) -> None:
    """cache[b, ..., rows[b, a], ...] = values[b, ..., a, ...] along ``dim`` (in place)."""


@_cache_write_rows_op.register_fake
def _(cache, rows, values, dim):
    return None


@_register("partial_attention")
def _partial_attention_op(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, mask: Tensor | None, scale: float | None
) -> Tensor:
    """Attention of the active rows' queries over every cached key.

    q (B, H, A, d) for the rows in ``rows``; k_cache/v_cache (B, KV, L, d) with H % KV == 0;
    ``mask`` broadcastable to (B, H, Lq, L) with Lq either 1 (a key padding mask) or L (a full
    query x key mask, whose query rows are gathered here). Bidirectional: no causal mask.
    ``scale`` None: 1/sqrt(d).
    """


@_partial_attention_op.register_fake
def _(q, k_cache, v_cache, rows, mask, scale):
    return q.new_empty(q.shape[:-1] + (v_cache.shape[-1],))


@_register("partial_attention_stats")
def _partial_attention_stats_op(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, mask: Tensor | None, scale: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``partial_attention`` plus its fp32 softmax statistics per query row: (out, m, l) with
    m (B, H, A) the row max of the scaled, masked scores and l = sum exp(s - m) (natural log)."""


@_partial_attention_stats_op.register_fake
def _(q, k_cache, v_cache, rows, mask, scale):
    out = q.new_empty(q.shape[:-1] + (v_cache.shape[-1],))
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32), q.new_empty(q.shape[:-1], dtype=torch.float32)


@_register("approx_attention")
def _approx_attention_op(
    q: Tensor,
    k: Tensor,
    changed: Tensor,
    dv_rows: Tensor,
    cached_ctx: Tensor,
    salient_rows: Tensor,
    salient_ctx: Tensor,
    mask: Tensor | None,
    scale: float | None,
    k_old_rows: Tensor | None = None,
    m_old: Tensor | None = None,
    l_old: Tensor | None = None,
    q_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DyLLM's approximate attention with saliency: every queried row's context = cached context
    + P[:, changed] . dV, salient rows exact; returns (ctx, stats (B, Nq, 3), m, l). Mode 2
    (cached softmax statistics) when m_old / l_old / k_old_rows are given; q covers the rows
    ``q_rows`` (B, Nq). See ``kernels/approx_attention.py``.
    """


@_approx_attention_op.register_fake
def _(q, k, changed, dv_rows, cached_ctx, *_):  # the shapes need q and cached_ctx only
    bsz, heads, n_rows = q.shape[:3]
    return (
        cached_ctx.new_empty(cached_ctx.shape),
        q.new_empty((bsz, n_rows, 3), dtype=torch.float32),
        q.new_empty((bsz, heads, n_rows), dtype=torch.float32),
        q.new_empty((bsz, heads, n_rows), dtype=torch.float32),
    )


REGISTERED = {
    "cache_write_rows": _cache_write_rows_op,
    "partial_attention": _partial_attention_op,
    "partial_attention_stats": _partial_attention_stats_op,
    "approx_attention": _approx_attention_op,
}

if HAS_TRITON and CUDA_KERNELS_ENABLED:
    for _name, _op in REGISTERED.items():
        _op.register_kernel("cuda")(KERNELS[_name].triton_impl)


def _uses_kernel(t: torch.Tensor) -> bool:
    """Whether a call on tensors living where ``t`` lives goes through the registered op."""
    return t.is_cuda and HAS_TRITON and CUDA_KERNELS_ENABLED


def _dispatching(name: str):
    op, impl = REGISTERED[name], KERNELS[name].torch_impl

    def call(first: torch.Tensor, *args, **kwargs):
        return op(first, *args, **kwargs) if _uses_kernel(first) else impl(first, *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = op.__doc__ if hasattr(op, "__doc__") else None
    call.op = op  # the registered op this stands for (tests compare the two)
    return call


cache_write_rows = _dispatching("cache_write_rows")
partial_attention = _dispatching("partial_attention")
partial_attention_stats = _dispatching("partial_attention_stats")
approx_attention = _dispatching("approx_attention")
