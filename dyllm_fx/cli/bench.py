"""``dyllm bench``: the methods table (see ``dyllm_fx.eval.methods_bench``)."""

from __future__ import annotations

import argparse

from ..eval.synthetic_tasks import HELD_OUT_PER_TASK as DEFAULT_N_PER_TASK
from ..eval.synthetic_tasks import TASKS
from ..options import DEFAULT_MODEL
from .common_args import add_threads_arg, apply_threads

# The options run_bench() takes under the same name.
RUN_ARGS = ("batch_size", "gen_length", "block_length", "steps", "compile", "repeats")


def add_bench_parser(sub, parents=()) -> None:
    p = sub.add_parser(
        "bench",
        help="every method side by side on held-out task prompts: accuracy, tokens/s, speedup",
        parents=list(parents),
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model folder, 'default' / 'default-dream' for the embedded LLaDA / Dream-architecture model, "
        "or FAMILY:random for a small random model of one family (llada, dream, llada_moe, mmada, "
        "diffusion_gemma; speed and agreement only: random weights have no accuracy)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated tasks of the suite (default: all {len(TASKS)})",
    )
    p.add_argument(
        "--n",
        type=int,
        default=DEFAULT_N_PER_TASK,
        help=f"held-out prompts per task (default {DEFAULT_N_PER_TASK}: {DEFAULT_N_PER_TASK * len(TASKS)} "
        "prompts over the suite)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.9,
        help="threshold of the '+ threshold' rows (default 0.9; on a Dream model these rows decode with "
        "alg=maskgit_plus, the others with Dream's default entropy)",
    )
    p.add_argument(
        "--tau",
        type=float,
        default=None,
        help="DyLLM's saliency threshold for its rows (default: the official per-model preset, 0.99 for "
        "LLaDA)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated method labels to run (default: all; vanilla always runs first)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time the methods round-robin this many times and keep each one's fastest pass (noisy machines)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also run every transformed method with its step compiled whole by inductor (a row each)",
    )
    add_threads_arg(p)
    p.add_argument(
        "--json", default=None, metavar="FILE", help="write the rows as JSON (input of `dyllm plot pareto`)"
    )
    p.add_argument(
        "--plot", default=None, metavar="FILE.png", help="draw the speed-accuracy plot (needs matplotlib)"
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from ..eval.methods_bench import (
        bench_examples,
        default_methods,
        format_tables,
        run_bench,
        write_outputs,
    )
    from ..eval.random_bench import family_of
    from ..loading import load, resolve_model_path

    family = family_of(args.model)  # an unknown FAMILY:random is refused here, before any work
    if args.plot and family is not None:
        raise ValueError(
            f"--plot draws speed against accuracy, and {args.model} (random weights) has no accuracy; drop "
            "--plot"
        )
    if args.plot:
        from ..analysis.plots import require_matplotlib

        require_matplotlib()  # before the bench runs, not after (an ImportError naming the extra)
    if family is not None:
        apply_threads(args)
        return _cmd_bench_random(args, family)
    apply_threads(args, resolve_model_path(args.model))
    methods = _chosen_methods(default_methods(threshold=args.threshold, tau=args.tau), args.methods)
    model, tok = load(args.model, device=args.device)
    examples = bench_examples(args.n, tuple(t.strip() for t in args.tasks.split(",")))
    bench = run_bench(model, tok, examples, methods, **{name: getattr(args, name) for name in RUN_ARGS})
    print(format_tables(bench))
    write_outputs(bench, args.json, args.plot)
    return 0


def _cmd_bench_random(args: argparse.Namespace, family) -> int:
    """The rows of a family's random model (``dyllm_fx.eval.random_bench``): --n prompts in one
    batch, --gen-length new tokens in blocks of --block-length, --steps denoising steps (default:
    one per token; DiffusionGemma: per canvas, default 8)."""
    from ..eval.random_bench import default_methods, format_random_table, run_random_bench

    if family.name == "diffusion_gemma":
        from ..eval.diffusion_gemma_bench import default_methods
    methods = _chosen_methods(default_methods(tau=args.tau), args.methods)
    results = run_random_bench(
        family,
        methods,
        n=args.n,
        gen_length=args.gen_length,
        block_length=args.block_length,
        steps=args.steps,
        repeats=args.repeats,
    )
    print(format_random_table(results, family.name))
    if args.json:
        import json
        from dataclasses import asdict

        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0


def _chosen_methods(methods: list, labels: str | None) -> list:
    """The baseline (first) method and those of --methods' comma-separated labels; an unknown
    label is an error that lists the available ones, raised before any model loads."""
    if not labels:
        return methods
    wanted = [m.strip() for m in labels.split(",")]
    unknown = sorted(set(wanted) - {m.label for m in methods})
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {[m.label for m in methods]}")
    return [methods[0]] + [m for m in methods[1:] if m.label in wanted]
