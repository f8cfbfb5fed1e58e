"""Checks on a model's tensors before the runtime allocates anything for it."""

from __future__ import annotations

import torch
from torch import nn


def check_model_tensors(model: nn.Module) -> torch.device:
    """The one device every parameter and buffer of ``model`` lives on; raises a ValueError
    naming the odd tensors when they are spread over devices (or left on ``meta``, i.e. never
    loaded) or when the floating-point parameters mix dtypes. The runtime allocates its inputs
    and caches on one device in one dtype; a mixed model otherwise fails deep inside a step,
    or, with a meta tensor, silently produces garbage."""
    tensors = [(f"parameter {n}", t) for n, t in model.named_parameters()]
    tensors += [(f"buffer {n}", t) for n, t in model.named_buffers()]
    if not tensors:
        raise ValueError(
            f"{type(model).__name__} has no parameters; pass the model itself, not a wrapper without weights"
        )
    meta = [name for name, t in tensors if t.device.type == "meta"]
    if meta:
        raise ValueError(
            f"{_preview(meta)} of {type(model).__name__} are on the meta device (never loaded). Load the "
            "weights "
            "with dyllm_fx.load(), or model.load_state_dict(state, assign=True), before generating."
        )
    devices = _group(tensors, lambda t: str(t.device))
    if len(devices) > 1:
        first = next(iter(devices))
        raise ValueError(
            f"{type(model).__name__} is spread over devices: "
            + "; ".join(f"{d}: {_preview(names)}" for d, names in devices.items())
            + f". Move it to one device, e.g. model.to({first!r})."
        )
    dtypes = _group(
        [(n, t) for n, t in tensors if n.startswith("parameter") and t.is_floating_point()],
        lambda t: str(t.dtype),
    )
    if len(dtypes) > 1:
        major = max(dtypes, key=lambda d: len(dtypes[d]))
        raise ValueError(
            f"{type(model).__name__} mixes parameter dtypes: "
            + "; ".join(f"{d}: {_preview(names)}" for d, names in dtypes.items())
            + f". Cast it to one dtype, e.g. model.to({major}), or load it with dyllm_fx.load(path, "
            "dtype=...)."
        )
    return tensors[0][1].device


def _group(named: list, key) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, t in named:
        groups.setdefault(key(t), []).append(name)
    return groups


def _preview(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown


def embedding_rows(model: nn.Module) -> int | None:
    """Rows of ``model``'s token embedding: the token ids it can read are 0 to rows - 1. None
    when it has no ``nn.Embedding`` to read them from (then ids are not bounds-checked)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if not isinstance(embedding, nn.Embedding):
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return embedding.num_embeddings if embedding is not None else None
