"""A checkpoint's own decoding defaults, from its ``generation_config.json``.

Dream's generation code (``generation_utils.py`` of Dream-v0, DiffuCoder and Dream-Coder) starts
from the checkpoint's generation config: the sampler settings ``alg``, ``alg_temp``,
``temperature``, ``top_p``, ``top_k`` and ``eps``, and the end-of-sequence ids (an Instruct
checkpoint lists its chat turn's end, ``<|im_end|>``, beside ``<|endoftext|>``). LLaDA's
generation code reads none of it, so only the end-of-sequence ids are taken for the LLaDA
family. The numbers are checked where the sampler is built (``dyllm_fx.load`` builds one from
them before any weight is read); here only their JSON types.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..values import check_integer
from .checkpoint import CheckpointError

GENERATION_CONFIG = "generation_config.json"
# The settings of Dream's generation config that choose how tokens are sampled and committed.
DREAM_SAMPLER_KEYS = ("alg", "alg_temp", "temperature", "top_p", "top_k", "eps")


def read_generation_config(folder: str | Path) -> dict[str, Any]:
    """``generation_config.json`` of ``folder`` ({} when the folder has none)."""
    path = Path(folder) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err}); fix it, copy it again from the original checkpoint, or "
            "delete it (the defaults then apply)"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object of settings")
    return raw


def sampler_defaults(raw: dict[str, Any], dream: bool) -> dict[str, Any]:
    """The sampler settings a Dream-family generation config sets (None values left out: the
    sampler's defaults apply); {} for the LLaDA family."""
    if not dream:
        return {}
    return {key: raw[key] for key in DREAM_SAMPLER_KEYS if raw.get(key) is not None}


def eos_token_ids(raw: dict[str, Any], source: str) -> tuple[int, ...]:
    """``eos_token_id`` of a generation config as a tuple (an int or a list of ints)."""
    value = raw.get("eos_token_id")
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    try:
        return tuple(check_integer("eos_token_id", i, minimum=0) for i in ids)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}; fix it in {GENERATION_CONFIG} or delete the key") from None


__all__ = [
    "DREAM_SAMPLER_KEYS",
    "GENERATION_CONFIG",
    "eos_token_ids",
    "read_generation_config",
    "sampler_defaults",
]
