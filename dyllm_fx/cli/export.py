"""``dyllm export --onnx OUT`` and the ``--onnx FILE`` option of ``dyllm generate``."""

from __future__ import annotations

import argparse

from ..options import DEFAULT_MODEL
from .common_args import add_threads_arg


def add_export_parser(sub, parents=()) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand on the ``dyllm`` parser."""
    p = sub.add_parser(
        "export",
        help="export the transformed denoising step to ONNX (standard ops; onnxruntime, TensorRT)",
        description="Export the sparse denoising step (caches and policy buffers in, updated ones out) of "
        "the "
        "transformed model. A row policy (dyllm, es_dllm, dllm_cache, compositions) exports one graph "
        "per step shape its generations can reach, for the layout given by --gen-length, "
        "--block-length, --steps / --threshold and --max-seq.",
        parents=list(parents),
    )
    p.add_argument("--onnx", required=True, metavar="OUT", help="the .onnx file to write")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder, or 'default' for the embedded model")
    p.add_argument(
        "--policy",
        default="dense",
        help="dense, fixed, prefix_cache, dual_cache (one graph, rows from the host), dyllm, es_dllm, "
        "dllm_cache or a composition such as dual_cache+dyllm (default dense)",
    )
    p.add_argument(
        "--policy-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy parameter, e.g. tau=0.99 (repeatable)",
    )
    p.add_argument(
        "--dtype", choices=["float32", "float16"], default="float32", help="weight dtype (default float32)"
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, at least 18 (default 18)")
    add_threads_arg(p)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes exporting a row policy's graphs side by side (default: one per core, at most 8)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("layout (row policies only): the generations the export serves")
    g.add_argument("--gen-length", type=int, default=None, help="response length (default 64)")
    g.add_argument("--block-length", type=int, default=None, help="block length (default 32)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    g.add_argument(
        "--threshold", action="store_true", help="serve confidence-threshold decoding (any tokens per step)"
    )
    g.add_argument(
        "--max-seq", type=int, default=None, help="longest prompt + response (default: the model's window)"
    )
    g.add_argument(
        "--max-commit",
        type=int,
        default=None,
        help="most tokens one step commits (default: from the schedule)",
    )
    return p


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .. import load, transform
    from ..errors import UsageError
    from ..export import to_onnx
    from ..export.onnx_export import MIN_OPSET, check_policy, require_onnx_export
    from ..export.step_module import is_layer_uniform
    from ..loading import resolve_model_path
    from ..policy_setup import parse_policy_args
    from ..runtime.policies import make_policy
    from ..values import check_output_path
    from .common_args import apply_threads

    params = parse_policy_args(args.policy_arg)
    if args.policy == "vanilla":
        raise UsageError(
            "--policy vanilla is the untransformed model, which has no cached step to export; export "
            "--policy dense "
            "(every row, every step) or a method such as dual_cache or dyllm"
        )
    policy = make_policy(args.policy, **params)
    check_policy(policy)  # everything below up to load() is checked before the model is loaded and traced
    layout = _layout(args, is_layer_uniform(policy), policy.name)
    if args.opset < MIN_OPSET:
        raise UsageError(f"--opset {args.opset} is too old: the step graph needs opset {MIN_OPSET} or later")
    apply_threads(args, resolve_model_path(args.model))
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    check_output_path(args.onnx, "--onnx")
    require_onnx_export()
    model, _ = load(args.model, dtype=getattr(torch, args.dtype), device="cpu")
    fast = transform(model, policy=args.policy, **params)  # with the model family's presets
    progress = not args.quiet
    path = to_onnx(
        fast,
        args.onnx,
        model_path=args.model,
        opset=args.opset,
        progress=progress,
        workers=args.workers,
        **layout,
    )
    size = path.stat().st_size / 2**20
    graphs = _graph_count(path)
    print(
        f"wrote {path} ({size:.1f} MiB, {len(fast.program.attn)} layers, policy {fast.policy.name}, "
        f"{graphs} step graph{'s' if graphs > 1 else ''}, opset {args.opset})"
    )
    return 0


LAYOUT_OPTIONS = ("gen_length", "block_length", "steps", "threshold", "max_seq", "max_commit")


def _layout(args: argparse.Namespace, uniform: bool, policy: str) -> dict:
    """The layout options as ``to_onnx`` arguments, checked as the denoising loop checks its
    schedule; a UsageError when they are given for a layer-uniform policy (its one graph
    serves every layout, so they would be silently ignored)."""
    from ..errors import UsageError
    from ..runtime.schedule import Layout

    given = [name for name in LAYOUT_OPTIONS if getattr(args, name) not in (None, False)]
    if uniform:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UsageError(
                f"{flags} only {'applies' if len(given) == 1 else 'apply'} to row policies (dyllm, es_dllm, "
                f"dllm_cache, compositions): policy {policy!r} "
                "exports one graph that serves every generation layout; drop them"
            )
        return {}
    layout = {name: getattr(args, name) for name in LAYOUT_OPTIONS}
    layout["gen_length"] = 64 if args.gen_length is None else args.gen_length
    layout["block_length"] = 32 if args.block_length is None else args.block_length
    for name in ("gen_length", "block_length", "steps", "max_seq", "max_commit"):
        if layout[name] is not None and layout[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {layout[name]}")
    if args.threshold and args.steps is not None:
        raise UsageError(
            "--steps and --threshold exclude each other: threshold decoding takes any number of steps"
        )
    Layout(**layout).check(None)  # the block schedule's own checks (the window is checked after loading)
    return layout


def _graph_count(path) -> int:
    """How many step graphs (branches) an exported file holds (1 for a layer-uniform one)."""
    import json

    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return len(json.loads(props.get("dyllm.branches", "[]"))) or 1


def load_onnx_model(args: argparse.Namespace, policy=None, policy_args=None):
    """(model, tokenizer) for ``dyllm generate --onnx FILE``: the tokenizer of the model folder
    recorded in the file, or of ``--model`` when one other than the default is given;
    ``policy`` overrides the one recorded at export (a layer-uniform graph runs any
    layer-uniform policy), ``policy_args`` sets a row policy's graph inputs (tau)."""
    from ..export import load_onnx
    from ..loading import load_tokenizer, resolve_model_path

    tokenizer = None
    if args.model not in (None, DEFAULT_MODEL):
        tokenizer = load_tokenizer(resolve_model_path(args.model))
    device = None if args.device in (None, "auto") else args.device
    model = load_onnx(
        args.onnx, device=device, tokenizer=tokenizer, policy=policy, policy_args=policy_args or None
    )
    return model, model.tokenizer


__all__ = ["add_export_parser", "cmd_export", "load_onnx_model"]
