"""``dyllm export --onnx OUT`` and the ``--onnx FILE`` option of ``dyllm generate``."""

from __future__ import annotations

import argparse

from .options import DEFAULT_MODEL


def add_export_parser(sub, parents=()) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand on the ``dyllm`` parser."""
    p = sub.add_parser(
        "export", help="export the transformed denoising step to ONNX (standard ops; onnxruntime, TensorRT)",
        description="Export one sparse denoising step (caches in, updated caches out) of the transformed model.",
        parents=list(parents),
    )
    p.add_argument("--onnx", required=True, metavar="OUT", help="the .onnx file to write")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder, or 'default' for the embedded model")
    p.add_argument("--policy", default="dense",
                   help="layer-uniform row policy recorded as the runner's default: dense, prefix_cache, dual_cache")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="weight dtype (default float32)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, at least 18 (default 18)")
    return p


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from . import load, transform
    from .export import to_onnx
    from .export.step_module import check_layer_uniform
    from .runtime.policies import make_policy

    policy = make_policy(args.policy)
    check_layer_uniform(policy)  # before the model is loaded and traced
    model, _ = load(args.model, dtype=getattr(torch, args.dtype), device="cpu")
    fast = transform(model, policy=policy)
    path = to_onnx(fast, args.onnx, model_path=args.model, opset=args.opset)  # ImportError names the install
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB, {len(fast.program.attn)} layers, policy {args.policy}, opset {args.opset})")
    return 0


def load_onnx_model(args: argparse.Namespace, policy=None):
    """(model, tokenizer) for ``dyllm generate --onnx FILE``: the tokenizer of the model folder
    recorded in the file, or of ``--model`` when one other than the default is given;
    ``policy`` (a layer-uniform policy) overrides the one recorded at export."""
    from .export import load_onnx
    from .loading import load_tokenizer, resolve_model_path

    tokenizer = None
    if args.model not in (None, DEFAULT_MODEL):
        tokenizer = load_tokenizer(resolve_model_path(args.model))
    device = None if args.device in (None, "auto") else args.device
    model = load_onnx(args.onnx, device=device, tokenizer=tokenizer, policy=policy)
    return model, model.tokenizer


__all__ = ["add_export_parser", "cmd_export", "load_onnx_model"]
