"""``dyllm_fx.load``: a model folder (or ``"default"``) -> (model, tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .models import CheckpointError, load_model, read_config, resolve_architecture

DEFAULT_MODEL = "default"


def default_model_path() -> Path:
    """Folder of the embedded tiny-llada checkpoint shipped inside the package."""
    return Path(__file__).resolve().parent / "assets" / "tiny-llada"


def resolve_model_path(path_or_name: str | Path) -> Path:
    if str(path_or_name) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(path_or_name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder {str(path_or_name)!r} does not exist. dyllm-fx never downloads: pass a local "
            "folder holding config.json + *.safetensors (e.g. from `huggingface-cli download`), or 'default' "
            "for the embedded model."
        )
    return path


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer from the folder; falls back to its tokenizer.json when the folder's
    tokenizer class needs remote code (Dream), which dyllm-fx never runs."""
    folder = Path(folder)
    try:
        tok = AutoTokenizer.from_pretrained(
            # An empty config stops transformers from parsing config.json as one of its own
            # model types (it does not know llada / Dream and warns).
            str(folder), local_files_only=True, trust_remote_code=False, config=PretrainedConfig()
        )
    except (ValueError, OSError, KeyError) as err:
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(f"cannot load a tokenizer from {folder}: {err}") from err
        special = {}
        cfg_file = folder / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            special = {k: cfg[k] for k in ("eos_token", "pad_token", "bos_token", "mask_token", "unk_token") if isinstance(cfg.get(k), str)}
        tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **special)
    tok.padding_side = "left"  # the runtime left-pads ragged batches
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load(
    path_or_name: str | Path = DEFAULT_MODEL,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a LLaDA or Dream checkpoint folder and its tokenizer, with no network access.

    Args:
        path_or_name: a Hugging Face style folder (config.json + *.safetensors, optionally
            sharded with model.safetensors.index.json), or ``"default"`` for the embedded
            tiny-llada model.
        dtype: weight dtype; default float32 on CPU, bfloat16 on CUDA.
        device: default CUDA when available, else CPU.

    Returns:
        ``(model, tokenizer)``; ``model.diffusion`` holds the mask/EOS ids the runtime uses.
    """
    folder = resolve_model_path(path_or_name)
    resolve_architecture(read_config(folder))  # fail on an unknown architecture before reading weights
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(folder, dtype=dtype, device=device)
    return model, load_tokenizer(folder)
