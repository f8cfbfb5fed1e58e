"""Model definitions (LLaDA, Dream, LLaDA-MoE, MMaDA's language model, LLaDA2) and the registry
that picks one from a config.json."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    check_state_dict,
    config_to_dict,
    load_state_dict,
    parameter_count,
    read_config,
    safetensors_files,
    save_checkpoint,
)
from .dream import DreamConfig, DreamModel
from .llada import LLaDAConfig, LLaDAModelLM
from .llada2 import LLaDA2Config, LLaDA2ModelLM
from .llada_moe import LLaDAMoEConfig, LLaDAMoEModelLM
from .mmada import MMaDAConfig, MMaDAModelLM
from .spec import DiffusionSpec


@dataclass(frozen=True)
class Architecture:
    name: str
    config_cls: type
    model_cls: type
    model_types: tuple[str, ...]
    class_names: tuple[str, ...]


ARCHITECTURES = (
    Architecture("llada", LLaDAConfig, LLaDAModelLM, ("llada",), ("LLaDAModelLM",)),
    Architecture("dream", DreamConfig, DreamModel, ("dream",), ("DreamModel",)),
    Architecture("llada_moe", LLaDAMoEConfig, LLaDAMoEModelLM, ("lladamoe",), ("LLaDAMoEModelLM",)),
    Architecture("mmada", MMaDAConfig, MMaDAModelLM, ("mmada",), ("MMadaModelLM",)),
    Architecture("llada2", LLaDA2Config, LLaDA2ModelLM, ("llada2_moe",), ("LLaDA2MoeModelLM",)),
)


def resolve_architecture(config: dict[str, Any]) -> Architecture:
    """Pick the architecture from config.json's ``model_type`` or ``architectures``."""
    model_type = str(config.get("model_type", "")).lower()
    class_names = set(config.get("architectures") or ())
    for arch in ARCHITECTURES:
        if model_type in arch.model_types or class_names & set(arch.class_names):
            return arch
    known = ", ".join(f"{a.name} (model_type {a.model_types[0]!r})" for a in ARCHITECTURES)
    raise CheckpointError(
        f"unknown architecture: model_type={config.get('model_type')!r}, "
        f"architectures={sorted(class_names)}. "
        f"dyllm-fx loads {known}; for another model, build it yourself and pass the module to "
        "dyllm_fx.transform()."
    )


def parse_config(config: dict[str, Any], source: str = "config.json"):
    """The architecture's config dataclass for ``config`` (config.json's content, read from
    ``source``), every setting type- and range-checked: a CheckpointError names the key."""
    return resolve_architecture(config).config_cls.from_dict(config, source)


def build_model(config: dict[str, Any], source: str = "config.json") -> nn.Module:
    return resolve_architecture(config).model_cls(parse_config(config, source))


def load_model(
    folder: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prepare: Callable[[nn.Module], nn.Module] | None = None,
) -> nn.Module:
    """Build the model named by ``folder/config.json`` and fill it with the folder's safetensors.

    ``prepare`` rewrites the model before any weight is read (it is still on the meta device);
    a model it returns with ``tensor_parallel = (rank, size, group)`` (a tensor-parallel shard,
    ``passes/tensor_parallel.py``) reads only its own slices of the checkpoint."""
    config = read_config(folder)
    with torch.device("meta"):
        model = build_model(config, str(Path(folder) / "config.json"))
    if prepare is not None:
        model = prepare(model)
    shard = getattr(model, "tensor_parallel", None)
    if shard is not None:
        shard = ({k: tuple(v.shape) for k, v in model.state_dict().items()}, shard[0], shard[1])
    state = load_state_dict(folder, dtype=dtype, device=device, shard=shard)
    check_state_dict(model, state, str(folder))
    model.load_state_dict(state, assign=True)
    return model.eval()


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The config.json content that rebuilds ``model`` (for saving checkpoints)."""
    # the most derived class first: MMaDA's model is a LLaDA model
    for arch in sorted(ARCHITECTURES, key=lambda a: -len(a.model_cls.__mro__)):
        if isinstance(model, arch.model_cls):
            return config_to_dict(model.config, arch.model_types[0], arch.class_names[0])
    raise TypeError(f"{type(model).__name__} is not a dyllm-fx model class")


def save_model(model: nn.Module, folder: str | Path, max_shard_bytes: int | None = None) -> Path:
    return save_checkpoint(model, folder, model_config_dict(model), max_shard_bytes)


__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "DiffusionSpec",
    "DreamConfig",
    "DreamModel",
    "LLaDA2Config",
    "LLaDA2ModelLM",
    "LLaDAConfig",
    "LLaDAModelLM",
    "LLaDAMoEConfig",
    "LLaDAMoEModelLM",
    "MMaDAConfig",
    "MMaDAModelLM",
    "build_model",
    "load_model",
    "model_config_dict",
    "parameter_count",
    "parse_config",
    "read_config",
    "resolve_architecture",
    "safetensors_files",
    "save_model",
]
