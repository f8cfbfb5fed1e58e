"""Hugging Face style spellings of the loading options: dtypes by name (``"bfloat16"``,
``"fp16"``, ``"auto"``), ``torch_dtype=``, ``device="auto"`` / ``0`` / ``"cuda:1"``.

Each is checked before anything is read, with a message that names the fix. torch is imported
inside the functions only, so the command line can import this module for its defaults.
"""

from __future__ import annotations

from typing import Any

from .errors import UsageError

DEFAULT_MODEL = "default"
DEFAULT_DREAM_MODEL = "default-dream"  # the embedded Dream-architecture model

# Spellings accepted for a dtype (the CLI's --dtype choices are the first column's names).
DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
}
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16", "float64")
DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"


def _torch():
    import torch

    return torch


def resolve_dtype(dtype: Any = None, *, torch_dtype: Any = None, device=None, config: dict | None = None):
    """The torch dtype to load weights in.

    ``dtype`` / ``torch_dtype`` (transformers' older name; give one of them) may be a
    ``torch.dtype``, a name (``"bfloat16"``, ``"bf16"``, ``"torch.float16"``, ...) or ``"auto"``:
    the checkpoint's ``torch_dtype`` from config.json. ``None``: bfloat16 on CUDA, float32
    elsewhere."""
    torch = _torch()
    if torch_dtype is not None:
        if dtype is not None and _canon(dtype) != _canon(torch_dtype):
            raise UsageError(
                f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only one of them (dtype=)"
            )
        dtype = torch_dtype
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        saved = (config or {}).get("torch_dtype") or (config or {}).get("dtype")
        dtype = saved if isinstance(saved, str) and _canon(saved) in DTYPE_ALIASES.values() else None
    if dtype is None:
        device = resolve_device(device)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        name = _canon(dtype)
        if name not in DTYPE_ALIASES:
            raise UsageError(
                f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)} (or a torch dtype such as "
                "torch.bfloat16)"
            )
        dtype = getattr(torch, DTYPE_ALIASES[name])
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a torch.dtype or a name such as 'bfloat16', got {type(dtype).__name__} {dtype!r}"
        )
    if not dtype.is_floating_point:
        raise UsageError(
            f"dtype {dtype} is not a floating-point dtype; the weights load as float32, bfloat16 or float16 "
            "(quantized integer weights are not supported)"
        )
    return dtype


def _canon(dtype: Any) -> str:
    text = str(dtype).strip().lower()
    text = text.removeprefix("torch.")
    return DTYPE_ALIASES.get(text, text)


def resolve_device(device: Any = None):
    """A ``torch.device`` that exists on this machine.

    ``None`` / ``"auto"``: CUDA when available, else the CPU. An int is a CUDA index (as in
    transformers). A device this machine lacks (``"cuda"`` on a CPU-only torch, ``"cuda:3"``
    with one GPU) or a name torch does not know (``"tpu"``) is an error that says what exists."""
    torch = _torch()
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool):
        raise TypeError(f"device must be a string, an int or a torch.device, got {device!r}")
    if isinstance(device, int):
        device = f"cuda:{device}"
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"device must be a string, an int or a torch.device, got {type(device).__name__} {device!r}"
        )
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {device!r}; use {DEVICE_HELP}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise UsageError("device 'meta' holds no weights; use " + DEVICE_HELP)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(
                f"device {str(device)!r} asked for, but {why} (torch {torch.__version__}); use device='cpu' "
                "or 'auto'"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UsageError(
                f"device {str(device)!r} does not exist: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
        return dev
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise UsageError(f"device {str(device)!r} is not available on this machine; use {DEVICE_HELP}")
    return dev


__all__ = [
    "DEFAULT_DREAM_MODEL",
    "DEFAULT_MODEL",
    "DTYPE_ALIASES",
    "DTYPE_CHOICES",
    "resolve_device",
    "resolve_dtype",
]
