"""``dyllm plot saliency`` and ``dyllm plot pareto``: PNG figures (needs the [plot] extra)."""

from __future__ import annotations

import argparse
import sys


def add_plot_parser(sub, parents=()) -> argparse.ArgumentParser:
    """Register the ``plot`` subcommand (with ``saliency`` and ``pareto``) on the ``dyllm`` parser."""
    from .common_args import add_decoding_args, add_model_args

    p = sub.add_parser(
        "plot",
        help='figures: saliency heatmap of a generation, speed-accuracy plot (pip install -e ".[plot]")',
        parents=list(parents),
    )
    kinds = p.add_subparsers(dest="plot", required=True)

    sal = kinds.add_parser(
        "saliency",
        help="steps x layers active fraction and steps x positions maps of one generation",
        parents=list(parents),
    )
    add_model_args(sal, default_policy="dual_cache")
    sal.add_argument("--prompt", required=True, help="the prompt to generate for")
    sal.add_argument("--out", required=True, help="PNG file to write")
    sal.add_argument(
        "--layer", type=int, default=None, help="layer of the per-position maps (default: the middle layer)"
    )
    add_decoding_args(sal)

    par = kinds.add_parser(
        "pareto", help="accuracy against speed from a methods-benchmark JSON", parents=list(parents)
    )
    par.add_argument(
        "bench", help='JSON with {"rows": [{"method", "accuracy", "tokens_per_s", ...}], "device"}'
    )
    par.add_argument("--out", required=True, help="PNG file to write")
    par.add_argument("--x", choices=["tokens_per_s", "speedup"], default="tokens_per_s", help="speed axis")
    return p


def cmd_plot(args: argparse.Namespace) -> int:
    from ..analysis.plots import plot_pareto, plot_saliency, require_matplotlib

    require_matplotlib()  # before loading any weights (an ImportError naming the extra)
    if args.plot == "pareto":
        out = plot_pareto(args.bench, args.out, x=args.x)
    else:
        from ..analysis.saliency_trace import record_saliency
        from ..loading import load
        from ..policy_setup import VANILLA
        from .common_args import check_run, decoding_kwargs

        if args.policy == VANILLA:
            raise ValueError(
                "policy 'vanilla' recomputes every row at every step: there is nothing to plot; pick a "
                "transform() policy"
            )
        load_kw = check_run(args)
        model, tokenizer = load(args.model, **load_kw)
        trace = record_saliency(
            model,
            tokenizer,
            args.prompt,
            policy=args.policy,
            policy_args=args.policy_args,
            layer=args.layer,
            compile=args.compile,
            **decoding_kwargs(args),
        )
        out = plot_saliency(trace, args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0
