"""The ``dyllm::`` ops as the eager runtime calls them.

A ``torch.library.custom_op`` call from Python pays its dispatch (argument defaults, the
autograd and ADInplaceOrView layers) before its implementation runs: tens of microseconds, as
much as the work itself on the engine's small CPU tensors (``benchmarks/cpu_ops.py``: a small
cache write takes about 3x as long through the op as direct). A DyLLM layer makes about eight
such calls. The functions here take the op's own CPU implementation directly for CPU tensors in
eager code, and the op otherwise: CUDA tensors reach the Triton kernels, and anything traced
(torch.compile, torch.export) sees the opaque ``dyllm::`` node with its fake implementation.

Only the runtime's own calls go through here; the graphs the passes build keep calling the ops,
so exported and compiled pieces are unchanged.
"""

from __future__ import annotations

import functools

import torch

from . import ops
from .approx_attention import approx_attention_fast
from .cache_scatter import cache_write_rows_reference
from .partial_attention import partial_attention_stats_fast


def _direct_on_cpu(op, cpu_impl):
    @functools.wraps(cpu_impl)
    def call(first: torch.Tensor, *args, **kwargs):
        if first.device.type == "cpu" and not torch.compiler.is_compiling():
            return cpu_impl(first, *args, **kwargs)
        return op(first, *args, **kwargs)

    call.op = op  # the op this stands for (tests check the two agree)
    return call


cache_write_rows = _direct_on_cpu(ops.cache_write_rows, cache_write_rows_reference)
partial_attention_stats = _direct_on_cpu(ops.partial_attention_stats, partial_attention_stats_fast)
approx_attention = _direct_on_cpu(ops.approx_attention, approx_attention_fast)
gather_rows = ops.gather_rows  # a plain function already

__all__ = ["approx_attention", "cache_write_rows", "gather_rows", "partial_attention_stats"]
