"""The project's custom ops as plain aten math, for compilers that take an aten graph.

torch_tensorrt converts aten ops to TensorRT layers; an opaque ``dyllm::`` op would fall back
to PyTorch and split the engine. :func:`lower_custom_ops` replaces each custom op of a
functional step piece by the same computation in aten ops, matching the ONNX lowering in
``lowering.py`` op for op (scatter for the cache write; matmul, softmax, matmul for the
attention, softmax in float32).
"""

from __future__ import annotations

import math

import torch
from torch import fx

import dyllm_fx.kernels.dispatch  # noqa: F401  (registers torch.ops.dyllm.*)

from . import functional_ops  # noqa: F401  (registers torch.ops.dyllm_export.*)


def _row_index(rows: torch.Tensor, values: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, A) rows -> an index shaped like ``values``, with the rows along ``dim``."""
    shape = [1] * values.dim()
    shape[0], shape[dim] = rows.shape[0], rows.shape[1]
    return rows.view(shape).expand(values.shape)


def scatter_rows(cache: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, dim: int) -> torch.Tensor:
    """``dyllm_export::cache_write_rows`` in aten: a new cache with ``rows`` replaced."""
    return cache.scatter(dim, _row_index(rows, values, dim), values)


def attention_math(q, k_cache, v_cache, rows, mask, scale):
    """``dyllm::partial_attention`` in aten: softmax(q K^T * scale + mask) V over every key."""
    heads = q.shape[1]
    if k_cache.shape[1] != heads:
        k_cache = k_cache.repeat_interleave(heads // k_cache.shape[1], dim=1)
        v_cache = v_cache.repeat_interleave(heads // v_cache.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k_cache.float().transpose(-1, -2)) * scale
    if mask is not None:
        if mask.shape[-2] != 1:  # a full (.., L, L) mask: the active rows' query rows
            mask = mask.expand(rows.shape[0], *mask.shape[1:])
            index = rows[:, None, :, None].expand(rows.shape[0], mask.shape[1], rows.shape[1], mask.shape[-1])
            mask = mask.gather(2, index)
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        )
    probs = torch.softmax(scores, dim=-1).to(v_cache.dtype)
    return torch.matmul(probs, v_cache)


LOWERINGS = {
    torch.ops.dyllm_export.cache_write_rows.default: scatter_rows,
    torch.ops.dyllm.partial_attention.default: attention_math,
}


def lower_custom_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace (in place) every custom op of ``gm`` that has an aten lowering; returns ``gm``."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LOWERINGS:
            node.target = LOWERINGS[node.target]
    gm.graph.lint()
    gm.recompile()
    return gm


__all__ = ["LOWERINGS", "attention_math", "lower_custom_ops", "scatter_rows"]
