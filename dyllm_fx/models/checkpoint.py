"""Reading and writing Hugging Face style checkpoint folders (config.json + safetensors).

Supports a single ``model.safetensors`` and sharded checkpoints described by
``model.safetensors.index.json``. Nothing here touches the network.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import DyllmError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(DyllmError, ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message says what to fix."""


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no config.json; pass a Hugging Face model folder (config.json + *.safetensors)."
        )
    try:
        config = json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise CheckpointError(
            f"{path} is not a text file ({err}); replace it with the checkpoint's config.json"
        ) from None
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            "fix it or copy config.json again from the original checkpoint"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(config).__name__}, not an object of model settings; copy the "
            "checkpoint's config.json again"
        )
    return config


def safetensors_files(folder: str | Path) -> list[Path]:
    """The weight files of a folder, from the shard index if there is one."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (ValueError, AttributeError) as err:
            raise CheckpointError(
                f"{index} is not a valid shard index ({err}); copy it again from the original checkpoint"
            ) from None
        if not weight_map:
            raise CheckpointError(
                f"{index} has no weight_map; re-save the checkpoint with save_pretrained()."
            )
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are not in {folder}: {missing}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    if any(folder.glob("*.bin")):
        raise CheckpointError(
            f"{folder} holds only PyTorch .bin weights; convert them to safetensors "
            "(transformers: model.save_pretrained(dir, safe_serialization=True))."
        )
    raise CheckpointError(f"{folder} has no *.safetensors weights.")


def parameter_count(folder: str | Path) -> int:
    """The number of parameters in a folder's safetensors, from their headers (no weights read)."""
    total = 0
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def load_state_dict(
    folder: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    shard: tuple[dict[str, tuple[int, ...]], int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors, in ``dtype`` (floating-point ones) on ``device``.
    A CheckpointError names a file that cannot be read and the tensors holding NaN or inf.

    ``shard=(shapes, rank, size)`` reads one tensor-parallel rank's part only: the keys of
    ``shapes`` (the sharded model's state-dict shapes), each read whole where its shape is the
    checkpoint's, else the ``rank``-th of ``size`` slices along the one dim ``size`` times
    smaller; no other bytes are read."""
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                bad: list[str] = []
                overflow: list[str] = []
                for key in f.keys():
                    if shard is not None and key not in shard[0]:
                        continue  # another rank's tensor (a row-parallel bias lives on rank 0)
                    t = f.get_tensor(key) if shard is None else _read_part(f, key, *shard)
                    if t.is_floating_point() and not _all_finite(t):
                        bad.append(key)
                    elif dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                        if not _all_finite(t):
                            overflow.append(key)
                    state[key] = t
                _refuse_non_finite(file, bad, overflow, dtype)
        except (SafetensorError, OSError) as err:
            size = file.stat().st_size if file.exists() else 0
            raise CheckpointError(
                f"cannot read weights file {file} ({size} bytes): {err}. The file is corrupt or truncated "
                "(an interrupted download?); download it again"
            ) from err
    return state


def _read_part(f, key: str, shapes: dict[str, tuple[int, ...]], rank: int, size: int) -> torch.Tensor:
    """``key``'s slice for ``rank``: the dim where the checkpoint is ``size`` times the shard."""
    part = f.get_slice(key)
    full, want = tuple(part.get_shape()), tuple(shapes[key])
    if full == want:
        return f.get_tensor(key)
    split = [d for d, (a, b) in enumerate(zip(full, want)) if a != b]
    if len(full) != len(want) or len(split) != 1 or full[split[0]] != want[split[0]] * size:
        raise CheckpointError(
            f"{key}: checkpoint shape {full} does not split into {size} shards of {want}; check that "
            "config.json belongs to these weights"
        )
    dim, n = split[0], want[split[0]]
    index = tuple(slice(rank * n, (rank + 1) * n) if d == dim else slice(None) for d in range(len(full)))
    return part[index]


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite. A NaN or inf makes the sum non-finite, and a sum
    is far cheaper than an element-wise test over billions of weights; only a sum that is not
    finite (a NaN, or a sum that overflowed) pays for the exact test."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _refuse_non_finite(file: Path, bad: list[str], overflow: list[str], dtype) -> None:
    """A checkpoint of NaN / inf weights decodes to an empty or meaningless text without any
    other sign, so it is refused at load, naming the tensors."""
    if bad:
        raise CheckpointError(
            f"weights file {file} holds NaN or infinite values in {len(bad)} tensor(s): {_preview(bad)}. The "
            "checkpoint is damaged (a training run that diverged, or a broken conversion); use an earlier "
            "checkpoint or download it again"
        )
    if overflow:
        raise CheckpointError(
            f"weights file {file}: {_preview(overflow)} overflow {dtype} (values beyond its range become "
            "inf); load in a wider dtype, e.g. dtype='bfloat16' or 'float32'"
        )


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError that names every missing, unexpected or mis-shaped key."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_preview(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys {_preview(misshaped)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not match {type(model).__name__} built from its config.json: "
            + "; ".join(problems)
            + ". Check that config.json belongs to these weights and that the files are complete."
        )


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ... (%d more)' % (len(items) - limit) if len(items) > limit else ''}]"


def save_checkpoint(
    model: nn.Module, folder: str | Path, config: dict[str, Any], max_shard_bytes: int | None = None
) -> Path:
    """Write config.json and safetensors (sharded with an index when ``max_shard_bytes`` is set)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if max_shard_bytes is None:
        save_file(state, str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    return folder


def config_to_dict(cfg: Any, model_type: str, architecture: str) -> dict[str, Any]:
    return {"model_type": model_type, "architectures": [architecture], **asdict(cfg)}
