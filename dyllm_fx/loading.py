"""``dyllm_fx.load``: a model folder (or ``"default"``) -> (model, tokenizer)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .distributed import check_size, group_for
from .models import CheckpointError, build_model, load_model, parse_config, read_config, resolve_architecture
from .models.generation_config import (
    GENERATION_CONFIG,
    eos_token_ids,
    read_generation_config,
    sampler_defaults,
)
from .options import DEFAULT_DREAM_MODEL, DEFAULT_MODEL, resolve_device, resolve_dtype
from .passes.tensor_parallel import check_shardable, shard_model
from .runtime.samplers import DreamSampler

# Files any Hugging Face tokenizer is loaded from (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The embedded models shipped inside the package: name -> folder under dyllm_fx/assets.
EMBEDDED_MODELS = {DEFAULT_MODEL: "tiny-llada", DEFAULT_DREAM_MODEL: "tiny-dream"}


def default_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Folder of an embedded checkpoint shipped inside the package: ``"default"`` (LLaDA
    architecture) or ``"default-dream"`` (Dream architecture)."""
    if name not in EMBEDDED_MODELS:
        raise KeyError(f"no embedded model {name!r}; the package ships {sorted(EMBEDDED_MODELS)}")
    return Path(__file__).resolve().parent / "assets" / EMBEDDED_MODELS[name]


# How each embedded model is rebuilt when this install lacks it (a source checkout without the
# shipped weights, or a model the package does not ship yet).
_REBUILD = {
    DEFAULT_MODEL: "python examples/train_tiny_mdlm.py --arch llada --out dyllm_fx/assets/tiny-llada "
    "--overwrite-shipped",
    DEFAULT_DREAM_MODEL: "python examples/train_tiny_mdlm.py --arch dream --out dyllm_fx/assets/tiny-dream "
    "--overwrite-shipped",
}


def embedded_folder(name: str) -> Path:
    """The folder of embedded model ``name``; a FileNotFoundError naming the command that
    trains it when this install does not hold it."""
    folder = default_model_path(name)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded model {name!r} is not in this install ({folder} has no config.json). Train it "
            "with "
            f"`{_REBUILD[name]}` from a source checkout, or pass a local LLaDA / Dream checkpoint folder "
            "instead."
        )
    return folder


def embedded_model_name(path_or_name: str | Path) -> str | None:
    """The embedded model's name when ``path_or_name`` is one (by name or by folder), else None."""
    if str(path_or_name) in EMBEDDED_MODELS:
        return str(path_or_name)
    try:
        folder = Path(path_or_name).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    return next((name for name in EMBEDDED_MODELS if folder == default_model_path(name)), None)


def resolve_model_path(path_or_name: str | Path) -> Path:
    """The local folder of ``path_or_name``: ``"default"`` / ``"default-dream"`` (the embedded
    models), a folder, or a Hub id (``"GSAI-ML/LLaDA-8B-Instruct"``) already in the local Hugging
    Face cache. Nothing is downloaded; a Hub id that is not cached gets the command that fetches it."""
    if not isinstance(path_or_name, (str, os.PathLike)):
        given = f"{type(path_or_name).__name__} {path_or_name!r}"[:120]
        raise TypeError(
            f"the model must be a folder path or a name, got {given}; pass 'default' (the embedded model), "
            "'default-dream', or a LLaDA / Dream checkpoint folder"
        )
    if str(path_or_name) in EMBEDDED_MODELS:
        return embedded_folder(str(path_or_name))
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(
            f"model {str(path_or_name)!r} is a file, not a folder; pass the folder that holds config.json + "
            "*.safetensors"
        )
    name = str(path_or_name)
    if _HUB_ID.match(name):
        cached = _hub_cache_folder(name)
        if cached is not None:
            return cached
        local = name.split("/")[1]
        raise FileNotFoundError(
            f"model {name!r} is not a local folder; it looks like a Hugging Face Hub id, and dyllm-fx never "
            "downloads. "
            f"Fetch it once with `hf download {name} --local-dir {local}` (older huggingface_hub: "
            f"`huggingface-cli download {name} --local-dir {local}`), then pass {local!r} as the model."
        )
    raise FileNotFoundError(
        f"model folder {name!r} does not exist. dyllm-fx never downloads: pass a local folder holding "
        "config.json + *.safetensors (e.g. from `hf download`), or 'default' / 'default-dream' for the "
        "embedded models."
    )


def _hub_cache_folder(repo_id: str) -> Path | None:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache, if it is there (no network)."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or huggingface_hub missing / too old: nothing to reuse
        return None
    return folder if (folder / "config.json").is_file() else None


def check_tokenizer_files(folder: str | Path) -> None:
    """A CheckpointError when ``folder`` holds none of the files a tokenizer loads from."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy them from the "
            "original "
            "checkpoint, e.g. `hf download REPO --include 'tokenizer*' --local-dir FOLDER`"
        )


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer from the folder; falls back to its tokenizer.json when the folder's
    tokenizer class needs remote code (Dream), which dyllm-fx never runs."""
    folder = Path(folder)
    check_tokenizer_files(folder)
    check_tokenizer_json(folder)
    try:
        tok = _auto_tokenizer(folder)
    except CheckpointError:
        raise
    except Exception as err:  # tokenizers raises bare Exceptions on a file it cannot parse
        raise CheckpointError(
            f"cannot load the tokenizer of {folder} ({type(err).__name__}: {err}); its tokenizer files "
            f"({', '.join(n for n in TOKENIZER_FILES if (folder / n).is_file())}) are damaged or do not "
            "belong together: copy them again from the original checkpoint"
        ) from err
    tok.padding_side = "left"  # the runtime left-pads ragged batches
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_tokenizer_json(folder: Path) -> None:
    """A CheckpointError naming the tokenizer JSON file of ``folder`` that is not valid JSON."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(
                f"tokenizer file {path} is not valid JSON ({err}); copy it again from the original checkpoint"
            ) from None


def _auto_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(
            # An empty config stops transformers from parsing config.json as one of its own
            # model types (it does not know llada / Dream and warns).
            str(folder),
            local_files_only=True,
            trust_remote_code=False,
            config=PretrainedConfig(),
        )
    except (ValueError, OSError, KeyError) as err:
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(f"cannot load a tokenizer from {folder}: {err}") from err
        special = {}
        cfg_file = folder / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            special = {
                k: cfg[k]
                for k in ("eos_token", "pad_token", "bos_token", "mask_token", "unk_token")
                if isinstance(cfg.get(k), str)
            }
        tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **special)
        template = shipped_chat_template(folder)
        if template is not None:
            tok.chat_template = template
    return tok


def shipped_chat_template(folder: Path) -> str | dict | None:
    """The chat template a checkpoint ships, for the tokenizer built from its tokenizer.json
    (the folder's own tokenizer class needs remote code): ``chat_template.jinja``, else
    tokenizer_config.json's ``chat_template`` (a string, or a list of named templates)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg_file = folder / "tokenizer_config.json"
    template = json.loads(cfg_file.read_text()).get("chat_template") if cfg_file.is_file() else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named if all(isinstance(k, str) and isinstance(v, str) for k, v in named.items()) else None
    return template if isinstance(template, str) else None


def trained_gen_length(folder: str | Path) -> int | None:
    """The response window the model was trained with, when the folder records it
    (``training.json`` of the project's own training script: every stage's ``args.gen_length``)."""
    path = Path(folder) / "training.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    stages = record.get("stages") if isinstance(record.get("stages"), list) else [record]
    found = {
        s.get("args", {}).get("gen_length", s.get("gen_length"))
        for s in stages
        if isinstance(s, dict) and isinstance(s.get("args", {}), dict)
    }
    found.discard(None)
    if len(found) == 1:
        (value,) = found
        return value if isinstance(value, int) and value > 0 else None
    return None


def check_tensor_parallel(path_or_name: str | Path, tensor_parallel_size: int) -> None:
    """Refuse, from config.json alone (no weights, no process group), a model whose heads or
    layer widths do not divide by ``tensor_parallel_size``: a launcher checks this before it
    starts the ranks, which would otherwise each meet the error after loading."""
    if check_size(tensor_parallel_size) == 1:
        return
    folder = resolve_model_path(path_or_name)
    config = read_config(folder)
    with torch.device("meta"):
        model = build_model(config, str(folder / "config.json"))
    check_shardable(model, tensor_parallel_size)


def load(
    path_or_name: str | Path = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: str | int | torch.device | None = None,
    *,
    torch_dtype: torch.dtype | str | None = None,
    tensor_parallel_size: int = 1,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a LLaDA or Dream checkpoint folder and its tokenizer, with no network access.

    Args:
        path_or_name: a Hugging Face style folder (config.json + *.safetensors, optionally
            sharded with model.safetensors.index.json), ``"default"`` / ``"default-dream"``
            for the embedded LLaDA / Dream-architecture models, or a Hub id already in the local Hugging Face
            cache.
        dtype: weight dtype: a ``torch.dtype``, a name (``"bfloat16"``, ``"float16"``,
            ``"float32"``) or ``"auto"`` (config.json's ``torch_dtype``); default float32 on
            CPU, bfloat16 on CUDA. ``torch_dtype=`` is accepted as transformers spells it.
        device: ``"auto"`` / None (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, an int (CUDA index) or a ``torch.device``.
        tensor_parallel_size: load this rank's shard only (its heads and its slice of every MLP,
            read as slices of the safetensors: a model too large for one device loads), for
            ``transform(model, tensor_parallel_size=N)``; needs the process group of N ranks
            (see :mod:`dyllm_fx.distributed`).

    Returns:
        ``(model, tokenizer)``; ``model.diffusion`` holds the mask/EOS ids the runtime uses.

    Every argument, the config, the architecture and the tokenizer are checked before the
    weights are read.
    """
    folder = resolve_model_path(path_or_name)
    device = resolve_device(device)
    config = read_config(folder)
    dtype = resolve_dtype(dtype, torch_dtype=torch_dtype, device=device, config=config)
    parse_config(config, str(folder / "config.json"))  # a wrong setting fails before the weights are read
    defaults = checkpoint_decoding(folder, dream=resolve_architecture(config).name == "dream")
    tokenizer = load_tokenizer(folder)
    prepare = None
    if check_size(tensor_parallel_size) != 1:
        group = group_for(tensor_parallel_size)
        rank = torch.distributed.get_rank()
        prepare = functools.partial(shard_model, rank=rank, size=tensor_parallel_size, group=group)
    model = load_model(folder, dtype=dtype, device=device, prepare=prepare)
    window = trained_gen_length(folder)
    if window is not None:
        defaults["trained_gen_length"] = window
    spec = getattr(model, "diffusion", None)
    if defaults and dataclasses.is_dataclass(spec):
        if "eos_token_ids" in defaults:  # config.json's first, then the generation config's others
            defaults["eos_token_ids"] = tuple(
                dict.fromkeys((*spec.eos_token_ids, *defaults["eos_token_ids"]))
            )
        model.diffusion = dataclasses.replace(spec, **defaults)
    return model, tokenizer


def checkpoint_decoding(folder: Path, dream: bool) -> dict:
    """The ``DiffusionSpec`` fields a folder's ``generation_config.json`` sets: a Dream-family
    checkpoint's sampler settings (``sampler_defaults``) and the end-of-sequence ids it lists
    (``eos_token_ids``, which ``load`` puts after config.json's). A setting the sampler refuses
    is a CheckpointError naming the file, raised before any weight is read."""
    raw = read_generation_config(folder)
    source = str(folder / GENERATION_CONFIG)
    fields: dict = {}
    sampler = sampler_defaults(raw, dream)
    if sampler:
        try:
            DreamSampler(**sampler)
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                f"{source}: {err}. dyllm-fx's Dream sampler does not support this setting; fix it in "
                f"{GENERATION_CONFIG}, or delete the key to decode with the default"
            ) from None
        fields["sampler_defaults"] = tuple(sorted(sampler.items()))
    eos = eos_token_ids(raw, source)
    if eos:
        fields["eos_token_ids"] = eos
    return fields
