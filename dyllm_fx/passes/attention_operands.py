"""The operands of an attention core, and the keys it reads that are not rows of the sequence.

``sdpa(q, k, v, mask)`` usually attends over the keys of the sequence's own rows. A block
diffusion decoder (DiffusionGemma) also attends over an encoder's K/V cache: the graph
concatenates that *key prefix* in front of the rows' new keys,

    k = cat([k_prefix, k_new], dim=2)        (then, maybe, GQA's head repeat)
    v = cat([v_prefix, v_new], dim=2)
    sdpa(q, k, v, mask)                      mask (.., P + L): the prefix's keys first

where the prefix does not depend on the residual stream (it is a table of the piece, read
whole). The cache-backed rewrite keeps a cache of the rows' keys (``k_new``) and concatenates
the same prefix in front of it, so the attention reads exactly what the original read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from .matching import SDPA, descendants, is_op, tensor_inputs

aten = torch.ops.aten
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
# Ops between the concatenation and the core that only repeat or re-lay the heads (GQA).
_HEAD_OPS = {
    aten.unsqueeze.default,
    aten.expand.default,
    aten.reshape.default,
    aten.view.default,
    aten.slice.Tensor,
    aten.clone.default,
    aten.contiguous.default,
    aten._unsafe_view.default,
    aten.repeat_interleave.self_int,
}


@dataclass
class AttentionOperands:
    core: fx.Node
    query: fx.Node
    key: fx.Node  # the core's key operand
    value: fx.Node
    mask: fx.Node | None
    scale: float | None
    dropout_p: float
    is_causal: bool
    k_new: fx.Node  # the keys of the rows themselves (B, KV, L, d): what the step cache holds
    v_new: fx.Node
    k_prefix: fx.Node | None = None  # keys in front of the rows (None: no prefix)
    v_prefix: fx.Node | None = None
    k_cat: fx.Node | None = None  # the concatenations that put the prefix in front
    v_cat: fx.Node | None = None

    @property
    def has_prefix(self) -> bool:
        return self.k_prefix is not None


def core_args(core: fx.Node) -> dict:
    args = dict(zip(_SDPA_ARGS, core.args))
    args.update(core.kwargs)
    return args


def attention_operands(core: fx.Node, on_rows: Callable[[fx.Node], bool]) -> AttentionOperands:
    """The operands of ``core`` (an SDPA node); ``on_rows(node)`` says whether a node depends
    on the rows (the residual stream). A key prefix is recognised when key and value are both
    concatenations (along the sequence dim, through head-repeat ops only) of one node that does
    not depend on the rows followed by one that does."""
    args = core_args(core)
    mask = args.get("attn_mask")
    ops = AttentionOperands(
        core,
        args["query"],
        args["key"],
        args["value"],
        mask if isinstance(mask, fx.Node) else None,
        args.get("scale"),
        args.get("dropout_p", 0.0) or 0.0,
        bool(args.get("is_causal", False)),
        args["key"],
        args["value"],
    )
    k_split, v_split = _prefix_cat(args["key"], on_rows), _prefix_cat(args["value"], on_rows)
    if k_split is not None and v_split is not None:
        ops.k_cat, ops.k_prefix, ops.k_new = k_split
        ops.v_cat, ops.v_prefix, ops.v_new = v_split
    return ops


def _prefix_cat(node: fx.Node, on_rows) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(cat, prefix, new) when ``node`` is cat([prefix, new], seq dim) up to head-repeat ops."""
    for _ in range(16):
        if is_op(node, {aten.cat.default}):
            parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            ndim = node.meta["val"].dim()
            if len(parts) == 2 and dim % ndim == ndim - 2 and not on_rows(parts[0]) and on_rows(parts[1]):
                return node, parts[0], parts[1]
            return None
        if not is_op(node, _HEAD_OPS):
            return None
        inputs = tensor_inputs(node)
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def piece_operands(graph: fx.Graph) -> AttentionOperands:
    """The operands of the one attention core of a piece's graph (rows: the ``h`` input)."""
    cores = [n for n in graph.nodes if is_op(n, SDPA)]
    if len(cores) != 1:
        raise ValueError(f"expected one attention core in the piece, found {len(cores)}")
    h = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "h")
    rows = descendants(h)
    return attention_operands(cores[0], rows.__contains__)


__all__ = ["AttentionOperands", "attention_operands", "core_args", "piece_operands"]
