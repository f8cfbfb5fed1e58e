"""Command-line pieces shared by ``dyllm generate``, ``eval`` and ``plot``: model, policy and
runtime options, the decoding keyword arguments of ``generate``, and the checks that run on
them before any weights load.

Nothing here imports torch at module level: ``dyllm --help`` must answer at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..options import DEFAULT_MODEL, DEVICE_HELP, DTYPE_CHOICES
from ..policy_setup import VANILLA, check_policy, parse_policy_args, policy_help


def add_model_args(p: argparse.ArgumentParser, default_policy: str = VANILLA) -> None:
    """--model, --device, --dtype, --threads, --policy, --policy-arg, --compile."""
    add_runtime_args(p)
    p.add_argument("--policy", default=default_policy, help=policy_help(default_policy))
    p.add_argument(
        "--policy-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy parameter, repeatable (numbers parsed; lists as 0,1,2), e.g. --policy-arg tau=0.99",
    )
    p.add_argument("--compile", action="store_true", help="compile the transformed pieces with inductor")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --threads."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder, or 'default' for the embedded model")
    p.add_argument("--device", default=None, help=f"{DEVICE_HELP} (default auto)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=DTYPE_CHOICES,
        help="weight dtype (default: bfloat16 on CUDA, float32 on CPU; auto: the checkpoint's torch_dtype)",
    )
    add_threads_arg(p)


# Below this many parameters a model runs fastest on one CPU thread (see default_threads).
SMALL_MODEL_PARAMETERS = 10_000_000


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """--threads, on every command that computes (its default: :func:`default_threads`)."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch CPU threads (default: 1 for a model under {SMALL_MODEL_PARAMETERS // 1_000_000}M "
        "parameters, such as the embedded ones; torch's choice for larger ones)",
    )


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument(
        "--gen-length",
        "--max-new-tokens",
        dest="gen_length",
        type=int,
        default=64,
        help="response window in tokens (default 64)",
    )
    g.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block size (default 32)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    g.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="confidence-threshold parallel decoding, e.g. 0.9 (Dream: with --alg maskgit_plus)",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature (default: the checkpoint's generation_config.json for the Dream family, "
        "else 0: greedy)",
    )
    g.add_argument("--remasking", choices=["low_confidence", "random"], default=None, help="LLaDA models")
    g.add_argument(
        "--alg",
        choices=["origin", "maskgit_plus", "topk_margin", "entropy"],
        default=None,
        help="Dream models (default: the checkpoint's generation_config.json, else entropy)",
    )
    g.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance (LLaDA)")
    g.add_argument(
        "--chat", action="store_true", help="apply the tokenizer's chat template (Instruct models)"
    )
    g.add_argument("--seed", type=int, default=0)


# The decoding group's options that ``generate()`` takes under the same name.
DECODING_ARGS = (
    "gen_length",
    "block_length",
    "steps",
    "threshold",
    "cfg_scale",
    "chat",
    "seed",
    "temperature",
)


def decoding_kwargs(args: argparse.Namespace) -> dict:
    """``generate()`` keyword arguments from the decoding argument group."""
    params = {name: getattr(args, name) for name in DECODING_ARGS}
    if params["temperature"] is None:
        del params["temperature"]  # the checkpoint's own setting, or the sampler's default
    if args.remasking:
        params["remasking"] = args.remasking
    if args.alg:
        params["alg"] = args.alg
    return params


def checkpoint_parameters(folder: str | Path) -> int | None:
    """The parameter count of a checkpoint folder (``models.parameter_count``), or None when its
    weights cannot be read: the load then names the problem, not the thread choice."""
    from ..models import parameter_count

    try:
        return parameter_count(folder)
    except Exception:  # missing, damaged or not safetensors: reported by the load with the file's name
        return None


def default_threads(parameters: int | None) -> int | None:
    """The CPU thread count for a model of ``parameters`` parameters: 1 below
    :data:`SMALL_MODEL_PARAMETERS`, else None (torch's choice, one per core).

    A small model's matrix products are too small to split: each of the thousands of ops in a
    generation then pays for waking and joining the other threads, and on a busy machine a thread
    that waits for a core stalls the whole op. A large model's products keep every core busy."""
    if parameters is not None and parameters < SMALL_MODEL_PARAMETERS:
        return 1
    return None


def apply_threads(args: argparse.Namespace, folder: str | Path | None = None) -> None:
    """Set torch's CPU threads: ``--threads``, else :func:`default_threads` of the checkpoint in
    ``folder`` (when given). Records the choice in ``args.threads``."""
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if threads is None and folder is not None:
        threads = default_threads(checkpoint_parameters(folder))
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
    args.threads = threads


def check_run(args: argparse.Namespace, policy: bool = True, decoding: bool = True) -> dict:
    """Every check that needs no weights, in one place, before the model loads: the model folder
    (or Hub id) and its config, the device and dtype, the policy and its parameters, the decoding
    options against the model family's sampler and the block schedule. Returns the keyword
    arguments of ``dyllm_fx.load`` (dtype, device) and sets the CPU thread count."""
    from ..generation import make_sampler
    from ..loading import check_tokenizer_files, resolve_model_path
    from ..models import read_config, resolve_architecture
    from ..options import resolve_device, resolve_dtype
    from ..runtime.schedule import BlockSchedule

    if policy:
        args.policy_args = parse_policy_args(args.policy_arg)
        check_policy(args.policy, args.policy_args, args.compile)
    folder = resolve_model_path(args.model)
    config = read_config(folder)
    arch = resolve_architecture(config)
    check_tokenizer_files(folder)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device=device, config=config)
    if decoding:
        kw = decoding_kwargs(args)
        sampler = {k: v for k, v in kw.items() if k in ("temperature", "remasking", "alg")}
        make_sampler(arch.name == "dream", threshold=kw["threshold"], **sampler)
        steps = kw["steps"] if kw["steps"] is not None or kw["threshold"] is not None else kw["gen_length"]
        BlockSchedule.build(
            0, kw["gen_length"], kw["block_length"], None if kw["threshold"] is not None else steps
        )
        if kw["cfg_scale"] < 0:
            raise ValueError(f"--cfg-scale must be >= 0, got {kw['cfg_scale']}")
    apply_threads(args, folder)
    return {"dtype": dtype, "device": device}


__all__ = [
    "add_decoding_args",
    "add_model_args",
    "add_runtime_args",
    "add_threads_arg",
    "apply_threads",
    "check_run",
    "decoding_kwargs",
    "DEFAULT_MODEL",
]
