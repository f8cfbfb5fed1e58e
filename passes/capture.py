"""Pass 1: capture one denoising forward as an aten-level FX graph.

``make_fx`` with pre-dispatch tracing keeps ``aten.linear``, ``aten.embedding`` and
``aten.scaled_dot_product_attention`` whole, so later passes match the transformer's
structure from ops and shapes. Sizes are symbolic (the batch and sequence length of
``input_ids``), so every piece cut from the graph runs on any number of rows. Parameters are
closed over, which makes them ``get_attr`` constants that share storage with the model.

The same capture serves a module (``transform()``) and a dynamo graph (the ``dyllm`` backend),
so both go through identical passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")


@dataclass
class CapturedGraph:
    gm: fx.GraphModule  # placeholders: input_ids, attention_mask, position_ids; returns logits
    batch_symbol: str  # symbolic batch size of input_ids, as printed by sympy
    seq_symbol: str  # symbolic sequence length of input_ids
    param_names: dict[str, str]  # get_attr target -> the parameter's name in the source module


def example_inputs(batch: int = 2, seq_len: int = 17) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with. Only their shapes matter; batch != seq_len keeps the two symbols apart."""
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    pos = torch.arange(seq_len).expand(batch, -1).contiguous()
    return ids, mask, pos


def capture(
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    named_tensors: dict[str, torch.Tensor] | None = None,
) -> CapturedGraph:
    """Trace ``forward(input_ids, attention_mask, position_ids) -> logits`` to an aten graph.

    ``named_tensors`` (name -> parameter) only labels the constants for ``explain()``.
    """
    with torch.no_grad():
        gm = make_fx(forward, tracing_mode="symbolic", pre_dispatch=True, _allow_non_fake_inputs=True)(*inputs)
    _drop_noop_conversions(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, INPUT_NAMES):
        node.name = node.target = name
    gm.recompile()
    ids_val = placeholders[0].meta["val"]
    by_ptr = {t.data_ptr(): name for name, t in (named_tensors or {}).items()}
    param_names = {
        n.target: by_ptr.get(getattr(gm, n.target).data_ptr(), n.target) for n in gm.graph.nodes if n.op == "get_attr"
    }
    return CapturedGraph(gm, str(ids_val.shape[0]), str(ids_val.shape[1]), param_names)


def _drop_noop_conversions(gm: fx.GraphModule) -> None:
    """Remove ``aten.to`` nodes that change nothing (``x.float()`` on a float32 tensor).

    Pre-dispatch tracing records them as aliases, and later uses of the tensor then read the
    alias; dropping them makes the residual stream one visible chain of adds.
    """
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout):
            src = node.args[0]
            before, after = src.meta.get("val"), node.meta.get("val")
            if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and (
                before.dtype == after.dtype and before.device == after.device
            ):
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
    gm.graph.lint()


def capture_module(model: torch.nn.Module) -> CapturedGraph:
    """Capture a model called as ``model(input_ids, attention_mask=..., position_ids=...)``."""

    def forward(input_ids, attention_mask, position_ids):
        out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return getattr(out, "logits", out)

    device = next(model.parameters()).device
    return capture(forward, tuple(t.to(device) for t in example_inputs()), dict(model.named_parameters()))
