"""The ``dyllm`` command line: ``generate``, ``info``, ``eval``, ``plot``, ``export``, ``bench``, ``serve``.

Error policy: bad input (the project's own errors, ``ValueError`` / ``TypeError`` from
validation, ``OSError`` for a path, ``ImportError`` for a missing optional package) prints
one line ``dyllm CMD: error: ...`` and exits with status 2; ``--debug`` (or ``DYLLM_DEBUG=1``)
shows the traceback too. Anything else is a bug: one line that says so, status 1, and the
traceback with ``--debug``. Ctrl-C exits with status 130 and no traceback.

torch is imported only inside the commands, so ``--help`` and ``--version`` answer at once, and a
mistake that needs no model is reported before it (``early_checks``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

from ..errors import DyllmError
from ..options import DEFAULT_MODEL
from .bench import add_bench_parser, cmd_bench
from .common_args import add_decoding_args, add_model_args, check_run, decoding_kwargs
from .early_checks import check_before_imports
from .eval import add_eval_parser, cmd_eval
from .export import add_export_parser, cmd_export
from .plot import add_plot_parser, cmd_plot
from .serve import add_serve_parser, cmd_serve

# Errors that mean "the input is wrong as given"; their messages name the fix.
# OSError: a file that is missing, a folder, read-only, or a full disk: the user's to fix, not a bug.
USER_ERRORS = (DyllmError, ValueError, TypeError, OSError, ImportError)


def _version() -> str:
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    from .. import __version__

    return f"dyllm-fx {__version__} (torch {installed('torch')}, transformers {installed('transformers')})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dyllm", description="Fast inference for masked diffusion LLMs (LLaDA, Dream)."
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback too")
    # Subcommands take --debug as well (`dyllm generate ... --debug`); SUPPRESS keeps a
    # subcommand from resetting a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on an error, show the full traceback too",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{generate,info,eval,plot,export,bench,serve}"
    )

    gen = sub.add_parser(
        "generate",
        parents=[common],
        help="generate a response for one or more prompts",
        description="Generate with the untransformed model (--policy vanilla, the default) or any "
        "accelerated method (--policy dual_cache+dyllm --policy-arg tau=0.9).",
    )
    gen.add_argument("prompts", nargs="+", help="prompt text(s); several prompts run as one batch")
    add_model_args(gen)
    gen.add_argument("--stats", action="store_true", help="print NFE, time and tokens/s to stderr")
    gen.add_argument(
        "--json", action="store_true", help="print the responses and statistics as one JSON object"
    )
    gen.add_argument(
        "--compare",
        action="store_true",
        help="also run vanilla (the untransformed model, one token per step: no --threshold) and print both "
        "timings and the speedup to stderr; each runs once to warm up, then its fastest of 3 runs counts",
    )
    gen.add_argument(
        "--onnx",
        default=None,
        metavar="FILE",
        help="run a step graph from `dyllm export --onnx` with onnxruntime",
    )
    add_decoding_args(gen)

    info = sub.add_parser("info", parents=[common], help="architecture and sizes of a model folder")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model folder, or 'default'")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    add_eval_parser(sub, parents=[common])
    add_plot_parser(sub, parents=[common])
    add_export_parser(sub, parents=[common])
    add_bench_parser(sub, parents=[common])
    add_serve_parser(sub, parents=[common])
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    if args.onnx:
        model, tokenizer = _onnx_model(args)
    else:
        load_kw = check_run(args)  # everything that needs no weights, before they load
        from ..loading import load
        from ..policy_setup import apply_policy

        model, tokenizer = load(args.model, **load_kw)
        vanilla = model
        model = apply_policy(model, args.policy, args.policy_args, compile=args.compile)
    from ..generation import generate

    if args.compare:
        out = _compare_with_vanilla(vanilla, model, tokenizer, args)
    else:
        out = generate(model, tokenizer, args.prompts, **decoding_kwargs(args))
    s = out.stats
    stats = {
        "steps": len(s.step_seconds),  # denoising steps run (threshold decoding: as many as it took)
        "nfe": s.nfe,
        "seconds": round(s.seconds, 4),
        "tokens_per_second": round(s.tokens_per_second, 2),
        "cache_bytes": s.cache_bytes,
        "stopped_early_at_block": s.stopped_early_at_block,
    }
    if args.json:
        report = {
            "model": args.model,
            "policy": _policy_name(model, args),
            "policy_args": getattr(args, "policy_args", {}),
            "onnx": args.onnx,
            "decoding": {**decoding_kwargs(args), "steps": _scheduled_steps(args)},
            "outputs": [{"prompt": p, "text": t} for p, t in zip(args.prompts, out.texts)],
            "stats": stats,
        }
        print(json.dumps(report, indent=2))
    else:
        for text in out.texts:
            print(text)
    if args.stats:
        print(f"nfe={s.nfe} seconds={s.seconds:.3f} tokens/s={s.tokens_per_second:.1f}", file=sys.stderr)
    return 0


COMPARE_RUNS = 3  # timed runs of each side of --compare, after one to warm up; the fastest counts


def _compare_with_vanilla(vanilla, model, tokenizer, args: argparse.Namespace):
    """``generate --compare``: vanilla (as ``dyllm bench``'s baseline row: the untransformed model
    with no threshold decoding) and the policy with the decoding options given, on the same
    prompts, timed alternately (a busy machine slows both alike); prints one line each and the
    speedup to stderr and returns the policy's output."""
    from ..generation import generate

    policy_kwargs = decoding_kwargs(args)
    vanilla_kwargs = {**policy_kwargs, "threshold": None}
    policy_label = args.policy + (f" --threshold {args.threshold}" if args.threshold is not None else "")
    sides = {"vanilla": (vanilla, vanilla_kwargs), policy_label: (model, policy_kwargs)}
    outputs = {name: generate(m, tokenizer, args.prompts, **kw) for name, (m, kw) in sides.items()}  # warm-up
    for _ in range(COMPARE_RUNS):
        for name, (m, kw) in sides.items():
            out = generate(m, tokenizer, args.prompts, **kw)
            if out.stats.seconds < outputs[name].stats.seconds:
                outputs[name] = out
    width = max(map(len, sides))
    for name, out in outputs.items():
        s = out.stats
        print(
            f"{name:<{width}}  nfe={s.nfe} seconds={s.seconds:.3f} tokens/s={s.tokens_per_second:.1f}",
            file=sys.stderr,
        )
    base, fast = outputs["vanilla"], outputs[policy_label]
    same = "the same text" if base.texts == fast.texts else "a different text"
    print(
        f"{policy_label}: {base.stats.seconds / fast.stats.seconds:.2f}x vanilla's speed, {same} "
        f"(fastest of {COMPARE_RUNS} runs each)",
        file=sys.stderr,
    )
    return fast


def _scheduled_steps(args: argparse.Namespace) -> int | None:
    """--steps, or its default (one step per token); None under threshold decoding (no schedule)."""
    if args.steps is not None:
        return args.steps
    return None if args.threshold is not None else args.gen_length


def _policy_name(model, args: argparse.Namespace) -> str:
    """The policy that ran: --policy, or for --onnx the runner's (the one recorded at export by default)."""
    policy = getattr(model, "policy", None)
    if not args.onnx:
        return args.policy
    return getattr(policy, "name", None) or args.policy


def _onnx_model(args: argparse.Namespace):
    from ..policy_setup import VANILLA, parse_policy_args
    from .common_args import apply_threads
    from .export import load_onnx_model

    args.policy_args = parse_policy_args(args.policy_arg)
    policy, policy_args = None, None
    if args.policy != VANILLA:
        from ..runtime.policies import make_policy

        policy = make_policy(args.policy, **args.policy_args)
    else:  # --policy-arg alone: the recorded policy's graph inputs (a row policy's tau)
        policy_args = args.policy_args
    apply_threads(args)
    return load_onnx_model(args, policy=policy, policy_args=policy_args)


def model_info(path_or_name: str) -> dict:
    """Architecture and sizes from config.json, without reading the weights."""
    import torch

    from ..loading import resolve_model_path
    from ..models import build_model, read_config, resolve_architecture, safetensors_files

    folder = resolve_model_path(path_or_name)
    config = read_config(folder)
    arch = resolve_architecture(config)
    with torch.device("meta"):
        model = build_model(config)
    cfg = model.config
    sizes = {
        "llada": ("n_layers", "d_model", "n_heads", "kv_heads", "mlp_hidden_size", "padded_vocab"),
        "dream": (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
        ),
    }[arch.name]
    layers, hidden, heads, kv_heads, mlp, vocab = (getattr(cfg, f) for f in sizes)
    files = safetensors_files(folder)
    return {
        "path": str(folder),
        "architecture": arch.name,
        "layers": layers,
        "hidden_size": hidden,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": hidden // heads,
        "mlp_hidden_size": mlp,
        "vocab_size": vocab,
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


HANDLERS = {
    "generate": cmd_generate,
    "info": cmd_info,
    "eval": cmd_eval,
    "plot": cmd_plot,
    "export": cmd_export,
    "bench": cmd_bench,
    "serve": cmd_serve,
}


@contextlib.contextmanager
def _one_line_warnings():
    """Warnings as ``dyllm: warning: ...`` lines on stderr (no file and line of the library)."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"dyllm: warning: {message}", file=sys.stderr if file is None else file)

    saved = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("DYLLM_DEBUG", "") not in ("", "0")
    where = f"dyllm {args.command}"
    try:
        check_before_imports(args)  # mistakes that need no model: reported before torch imports
        with _one_line_warnings():
            return HANDLERS[args.command](args)
    except KeyboardInterrupt:
        print(f"\n{where}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dyllm generate ... | head`: the reader left, nothing to report
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")
        return 0
    except USER_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"{where}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug:
            traceback.print_exc()
        hint = "" if debug else "; rerun with --debug for the traceback"
        print(
            f"{where}: internal error: {type(err).__name__}: {_one_line(err)}{hint}, and please report it",
            file=sys.stderr,
        )
        return 1


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, (KeyError,)) and text.startswith("'"):
        text = text.strip("'\"")
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
