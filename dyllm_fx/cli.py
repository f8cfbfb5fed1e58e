"""The ``dyllm`` command line: ``dyllm generate``, ``info``, ``eval``, ``plot`` and ``export``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from .cli_bench import add_bench_parser, cmd_bench
from .cli_eval import add_eval_parser, cmd_eval
from .cli_export import add_export_parser, cmd_export
from .cli_plot import add_plot_parser, cmd_plot
from .loading import DEFAULT_MODEL, resolve_model_path


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--gen-length", type=int, default=64, help="response window in tokens (default 64)")
    g.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block size (default 32)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    g.add_argument("--threshold", type=float, default=None, help="confidence-threshold parallel decoding, e.g. 0.9")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--remasking", choices=["low_confidence", "random"], default=None, help="LLaDA models")
    g.add_argument("--alg", choices=["origin", "maskgit_plus", "topk_margin", "entropy"], default=None, help="Dream models")
    g.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance (LLaDA)")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (Instruct models)")
    g.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dyllm", description="Fast inference for masked diffusion LLMs (LLaDA, Dream).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a response for one or more prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text(s); several prompts run as one batch")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="model folder, or 'default' for the embedded model")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--stats", action="store_true", help="print NFE, time and tokens/s to stderr")
    gen.add_argument("--onnx", default=None, metavar="FILE", help="run a step graph from `dyllm export --onnx` with onnxruntime")
    _add_decoding_args(gen)

    info = sub.add_parser("info", help="architecture and sizes of a model folder")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model folder, or 'default'")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    add_eval_parser(sub, _add_decoding_args)
    add_plot_parser(sub, _add_decoding_args)
    add_export_parser(sub)
    add_bench_parser(sub)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from . import generate, load

    if args.onnx:
        from .cli_export import load_onnx_model

        model, tokenizer = load_onnx_model(args)
    else:
        model, tokenizer = load(args.model, device=args.device)
    params = {"temperature": args.temperature}
    if args.remasking:
        params["remasking"] = args.remasking
    if args.alg:
        params["alg"] = args.alg
    out = generate(
        model, tokenizer, args.prompts, gen_length=args.gen_length, block_length=args.block_length,
        steps=args.steps, threshold=args.threshold, cfg_scale=args.cfg_scale, chat=args.chat,
        seed=args.seed, **params,
    )
    for text in out.texts:
        print(text)
    if args.stats:
        s = out.stats
        print(f"nfe={s.nfe} seconds={s.seconds:.3f} tokens/s={s.tokens_per_second:.1f}", file=sys.stderr)
    return 0


def model_info(path_or_name: str) -> dict:
    """Architecture and sizes from config.json, without reading the weights."""
    from .models import build_model, read_config, resolve_architecture, safetensors_files

    folder = resolve_model_path(path_or_name)
    config = read_config(folder)
    arch = resolve_architecture(config)
    with torch.device("meta"):
        model = build_model(config)
    cfg = model.config
    sizes = {
        "llada": ("n_layers", "d_model", "n_heads", "kv_heads", "mlp_hidden_size", "padded_vocab"),
        "dream": ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"),
    }[arch.name]
    layers, hidden, heads, kv_heads, mlp, vocab = (getattr(cfg, f) for f in sizes)
    files = safetensors_files(folder)
    return {
        "path": str(folder),
        "architecture": arch.name,
        "layers": layers, "hidden_size": hidden, "heads": heads, "kv_heads": kv_heads,
        "head_dim": hidden // heads, "mlp_hidden_size": mlp, "vocab_size": vocab,
        "parameters": sum(p.numel() for p in model.parameters()),
        "mask_token_id": model.diffusion.mask_token_id,
        "eos_token_ids": list(model.diffusion.eos_token_ids),
        "logits_shift": model.diffusion.logits_shift,
        "max_length": model.diffusion.max_length,
        "weight_files": [f.name for f in files],
        "weight_bytes": sum(f.stat().st_size for f in files),
    }


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "info": cmd_info, "eval": cmd_eval, "plot": cmd_plot, "export": cmd_export, "bench": cmd_bench}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, no traceback
        print(f"dyllm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
