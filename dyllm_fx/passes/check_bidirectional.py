"""Pass 2 of 6 (a check, rewrites nothing): the captured model attends bidirectionally.

dyllm-fx rewrites masked diffusion models, whose every position sees every other. A causal LM
(a transformers ``LlamaForCausalLM`` as loaded) traces to the same block structure and would be
rewritten and decoded without complaint, left to right attention and all. Two ways a graph
shows causal attention:

* an SDPA node with ``is_causal=True``;
* an attention mask that hides every later key from each query (lower-triangular). transformers
  5 builds such a mask and passes it explicitly rather than setting ``is_causal``.

The mask check evaluates only the nodes the masks are computed from, on the capture's example
inputs (no padding, so a bidirectional model's mask hides nothing), not the model.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .matching import SDPA, extract_outputs, is_op

_FIX = (
    "dyllm-fx rewrites bidirectional (masked diffusion) models only. For a transformers Llama / Qwen2 "
    "checkpoint trained as a diffusion model, wrap it first: dyllm_fx.models.hf.bidirectional(model, "
    "mask_token_id=...), which turns the causal mask off; a causal LM loaded as it is cannot be decoded by "
    "diffusion"
)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


class CausalAttentionError(ValueError):
    """The model attends causally; the message names the attention node and the fix."""


def _sdpa_args(node: fx.Node) -> dict:
    return {**dict(zip(_SDPA_ARGS, node.args)), **node.kwargs}


def check_bidirectional(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Raise :class:`CausalAttentionError` if an attention of ``gm`` is causal.

    ``inputs`` are the graph's example inputs (input_ids, attention_mask, position_ids); only
    the subgraph computing attention masks runs on them."""
    cores = [n for n in gm.graph.nodes if is_op(n, SDPA)]
    masks: dict[fx.Node, list[fx.Node]] = {}
    for node in cores:
        args = _sdpa_args(node)
        if args.get("is_causal") is True:
            raise CausalAttentionError(f"attention node '{node.name}' is causal (is_causal=True). {_FIX}")
        mask = args.get("attn_mask")
        if isinstance(mask, fx.Node):
            masks.setdefault(mask, []).append(node)
    if not masks:
        return
    for mask_node, value in zip(masks, _evaluate(gm, list(masks), inputs)):
        if isinstance(value, torch.Tensor) and is_causal_mask(value):
            core = masks[mask_node][0]
            raise CausalAttentionError(
                f"attention node '{core.name}' gets a causal mask (node '{mask_node.name}' hides every later "
                "key "
                f"from each query). {_FIX}"
            )


def is_causal_mask(mask: torch.Tensor) -> bool:
    """Whether an SDPA mask (bool: True = attend; float: added to the scores) hides every key
    after its query, for a square (..., L, L) mask with L > 1. A block-causal mask (LLaDA2: a
    query sees every key of its own block and of the blocks before it) is not: it is rewritten
    like a padding mask, each attention piece reading its rows of it."""
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2] or mask.shape[-1] < 2:
        return False
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask > torch.finfo(mask.dtype).min / 2
    else:
        return False
    n = mask.shape[-1]
    later = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    return bool((~allowed[..., later]).all())


def _evaluate(gm: fx.GraphModule, targets: list[fx.Node], inputs: tuple[torch.Tensor, ...]) -> list:
    """Values of ``targets``, running only their ancestors."""
    sub = extract_outputs(gm.graph, gm, targets)
    with torch.no_grad():
        return list(sub(*inputs))


def causal_modules(model: nn.Module) -> list[str]:
    """Names of submodules flagged causal (transformers attention modules set ``is_causal``)."""
    return [
        name or type(model).__name__
        for name, m in model.named_modules()
        if getattr(m, "is_causal", None) is True
    ]


def check_not_causal_modules(model: nn.Module) -> None:
    """Raise :class:`CausalAttentionError` when ``model`` holds attention modules flagged causal
    (the untransformed model is about to be decoded; transform() checks its graph instead)."""
    names = causal_modules(model)
    if names:
        shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        raise CausalAttentionError(
            f"{type(model).__name__} attends causally: {shown} set is_causal=True. {_FIX}"
        )


__all__ = [
    "CausalAttentionError",
    "causal_modules",
    "check_bidirectional",
    "check_not_causal_modules",
    "is_causal_mask",
]
