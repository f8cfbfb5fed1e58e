"""ONNX translations of the project's custom ops, in standard ONNX ops only.

``torch.onnx.export(..., dynamo=True, custom_translation_table=translation_table())`` calls
these functions while it builds the graph: each receives the op's tensor arguments as graph
values (shape and dtype known, sizes possibly symbolic) and its scalar arguments as Python
values, and emits ONNX nodes through ``onnxscript.opset18``. Nothing here needs a plugin or a
custom domain, so onnxruntime and TensorRT's ONNX parser read the result as is.

``gather_rows`` is not an op (it is ``expand`` + ``gather`` in aten), so torch's own
translation already lowers it to ``GatherElements``.
"""

from __future__ import annotations

import math

import torch
from onnxscript import ir
from onnxscript import opset18 as op

import dyllm_fx.kernels.dispatch  # noqa: F401  (registers torch.ops.dyllm.*)

from . import functional_ops  # noqa: F401  (registers torch.ops.dyllm_export.*)

_HALF_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _row_index(rows, values, dim: int):
    """(B, A) rows -> an index shaped like ``values``, with the rows along ``dim``."""
    rank = len(values.shape)
    axes = [axis for axis in range(1, rank) if axis != dim]
    index = op.Unsqueeze(rows, op.Constant(value_ints=axes)) if axes else rows
    return op.Expand(index, op.Shape(values))


def cache_write_rows(cache, rows, values, dim: int):
    """``dyllm_export::cache_write_rows`` -> ScatterElements (a new cache with ``rows`` replaced)."""
    dim = dim % len(cache.shape)
    return op.ScatterElements(cache, _row_index(rows, values, dim), values, axis=dim)


def _gather_query_rows(mask, rows):
    """A full (B|1, 1, L, L) mask -> (B, 1, A, L): the query rows of the active positions."""
    batch = op.Shape(rows, start=0, end=1)
    rest = op.Shape(mask, start=1)
    mask = op.Expand(mask, op.Concat(batch, rest, axis=0))
    index = op.Unsqueeze(rows, op.Constant(value_ints=[1, 3]))  # (B, 1, A, 1)
    shape = op.Concat(
        batch, op.Shape(mask, start=1, end=2), op.Shape(rows, start=1, end=2), op.Shape(mask, start=3), axis=0
    )
    index = op.Expand(index, shape)
    return op.GatherElements(mask, index, axis=2)


def _repeat_kv(x, heads: int):
    """(B, KV, L, d) -> (B, H, L, d): each key/value head serves H / KV query heads (GQA)."""
    kv_heads, head_dim = x.shape[1], x.shape[-1]
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        raise ValueError("partial_attention: key/value heads and head size must be static to export")
    if kv_heads == heads:
        return x
    x = op.Unsqueeze(x, op.Constant(value_ints=[2]))  # (B, KV, 1, L, d)
    group = op.Constant(value_ints=[1, 1, heads // kv_heads, 1, 1])
    x = op.Expand(x, op.Mul(op.Shape(x), group))  # the size-1 axis becomes the group size
    return op.Reshape(x, op.Constant(value_ints=[0, heads, -1, head_dim]))


def partial_attention(q, k_cache, v_cache, rows, mask=None, scale: float | None = None):
    """``dyllm::partial_attention`` -> MatMul / Softmax / MatMul over every cached key.

    q (B, H, A, d); caches (B, KV, L, d); mask an SDPA mask (bool: True attends, or additive
    float), (B|1, 1, 1, L) or (B|1, 1, L, L) whose query rows are gathered by ``rows``.
    Scores and softmax run in float32 for half-precision inputs. A query row whose keys are all
    masked gives NaN here (the torch reference gives zeros); the runtime never builds one, since
    key padding only hides the left padding, never the generated tokens.
    """
    heads, head_dim = q.shape[1], q.shape[-1]
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise ValueError("partial_attention: heads and head size must be static to export")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    k = _repeat_kv(k_cache, heads)
    v = _repeat_kv(v_cache, heads)
    out_type = q.dtype
    if out_type in _HALF_TYPES:
        q, k = op.Cast(q, to=ir.DataType.FLOAT), op.Cast(k, to=ir.DataType.FLOAT)
    scores = op.Mul(
        op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), op.CastLike(op.Constant(value_float=scale), q)
    )
    if mask is not None:
        # Read the mask's type and shape before gathering: values built here carry no type yet.
        is_bool = mask.dtype == ir.DataType.BOOL
        query_dim = mask.shape[-2]
        if not (isinstance(query_dim, int) and query_dim == 1):
            mask = _gather_query_rows(mask, rows)
        if is_bool:
            scores = op.Where(mask, scores, op.CastLike(op.Constant(value_float=-math.inf), scores))
        else:
            scores = op.Add(scores, op.CastLike(mask, scores))
    probs = op.Softmax(scores, axis=-1)
    if out_type in _HALF_TYPES:
        probs = op.Cast(probs, to=out_type)
    return op.MatMul(probs, v)


def sort_stable(self, *, stable: bool | None = None, dim: int = -1, descending: bool = False):
    """``aten::sort.stable`` (the policies' top-C selections sort with ``stable=True``, which
    torch's ONNX library does not translate) -> ``TopK`` over the whole axis. TopK orders equal
    values by index, lowest first (the ONNX spec; onnxruntime does), which is a stable sort in
    either direction."""
    k = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, k, axis=dim, largest=1 if descending else 0, sorted=1)


def amax(self, dim=(), keepdim: bool = False):
    """``aten::amax`` including its reduce-everything form (``dim=()``), which torch's ONNX
    library rejects -> ``ReduceMax``."""
    keep = 1 if keepdim else 0
    if not dim:
        return op.ReduceMax(self, keepdims=keep)
    return op.ReduceMax(self, op.Constant(value_ints=list(dim)), keepdims=keep)


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: op overload -> ONNX builder."""
    return {
        torch.ops.dyllm_export.cache_write_rows.default: cache_write_rows,
        torch.ops.dyllm.partial_attention.default: partial_attention,
        torch.ops.aten.sort.stable: sort_stable,
        torch.ops.aten.amax.default: amax,
    }


__all__ = ["amax", "cache_write_rows", "partial_attention", "sort_stable", "translation_table"]
