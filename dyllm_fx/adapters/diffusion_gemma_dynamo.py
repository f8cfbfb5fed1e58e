"""``torch.compile(model, backend="dyllm")`` for DiffusionGemma (``dyllm_fx.backend`` picks it).

Dynamo's graph of a decoder call (``model(decoder_input_ids=..., cache=..., ...)``, which is
what transformers' generation loop calls every step) has the step's inputs as graph inputs;
they are mapped back by their source (``L['kwargs']['cache'].layers[3].keys`` ...) and run
through one transformed model per compiled module and options.
"""

from __future__ import annotations

import re
import warnings
import weakref

import torch
from torch import nn

from .diffusion_gemma_layout import PrefixCache

_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {options key: transformed}


def dynamo_step(adapter, module: nn.Module, gm, options: dict):
    """The dyllm backend's callable for a graph dynamo traced from ``module``'s forward: a decoder
    call goes through the module's transformed model (``adapter.transform``; one per module and
    options, shared by every graph); any other graph (one that runs the encoder) runs as it is."""
    roles = _dynamo_roles(gm)
    outputs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    if roles is None or n_out != 1:
        warnings.warn(
            "dyllm backend: this DiffusionGemma graph is not a decoder call (decoder_input_ids over an "
            "encoder cache, "
            "returning logits); it runs as dynamo traced it, untransformed",
            stacklevel=2,
        )
        return gm.forward
    policy = options.pop("policy", "dense")
    compile_step = options.pop("compile_step", options.pop("compile_pieces", True))
    options.pop("mask_token_id", None)
    options.pop("block_length", None)
    key = (
        repr(policy),
        bool(compile_step) if not isinstance(compile_step, str) else compile_step,
        repr(sorted(options.items())),
    )
    per_module = _SHARED.setdefault(module, {})
    built: list = []

    def transformed():
        # built on the first real call: while the backend runs, dynamo's fake-tensor mode is
        # active, and the capture needs the real weights
        if not built:
            if key not in per_module:
                per_module[key] = adapter.transform(module, policy, compile=compile_step, **options)
            built.append(per_module[key])
        return built[0]

    def compiled(*inputs):
        model = transformed()
        layout = model.layout
        got = {}
        for i, role in roles.items():
            got[role] = inputs[i]
        keys = [got[("k", i)] for i in range(layout.n_layers)]
        values = [got[("v", i)] for i in range(layout.n_layers)]
        masks = {t: got.get(("mask", t)) for t in layout.types}
        with torch.no_grad():
            logits = model.decode(
                got["canvas"],
                PrefixCache(keys, values),
                got.get("sc"),
                got.get("sc_mask"),
                masks,
                got.get("pos"),
            )
        return (logits,)

    compiled.transformed = built  # filled on the first call: [TransformedDiffusionGemma]
    return compiled


def _dynamo_roles(gm) -> dict | None:
    """Graph input index -> role, from the inputs' sources; None when the graph is not a decoder
    call this module can map (it reads input_ids, a 2-D decoder mask, or an unknown input)."""
    roles = {}
    names = {
        "['decoder_input_ids']": "canvas",
        "['self_conditioning_logits']": "sc",
        "['self_conditioning_mask']": "sc_mask",
        "['decoder_position_ids']": "pos",
    }
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = (
            source.name
            if isinstance(getattr(source, "name", None), str)
            else (source.name() if source is not None else "")
        )
        value = node.meta.get("example_value")
        if name.startswith("L['self']") or not isinstance(value, torch.Tensor):
            continue  # weights, buffers and symbolic sizes
        role = next((r for suffix, r in names.items() if name.endswith(suffix)), None)
        if role is None and (m := re.search(r"\.layers\[(\d+)\]\.(keys|values)$", name)):
            role = ("k" if m.group(2) == "keys" else "v", int(m.group(1)))
        if role is None and (m := re.search(r"\['decoder_attention_mask'\]\['(\w+)'\]$", name)):
            role = ("mask", m.group(1))
        if role is None:
            return None
        roles[i] = role
    return roles if "canvas" in roles.values() else None


__all__ = ["dynamo_step"]
