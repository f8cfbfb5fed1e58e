"""``dyllm eval``: accuracy, speed, active fraction and agreement with vanilla of one policy."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..eval.extractors import EXTRACTORS
from ..eval.jsonl_tasks import SUITE, SUITE_PER_TASK
from ..policy_setup import VANILLA
from .common_args import add_decoding_args, add_model_args, check_run, decoding_kwargs


def add_eval_parser(sub, parents=()) -> argparse.ArgumentParser:
    """Register the ``eval`` subcommand on the ``dyllm`` parser."""
    p = sub.add_parser(
        "eval",
        help="exact-match accuracy, tokens/s, NFE, active fraction and agreement with vanilla decoding",
        description='Evaluate one policy on the synthetic suite or a JSONL file of {"prompt", "answer"} '
        "lines.",
        parents=list(parents),
    )
    add_model_args(p)
    p.add_argument(
        "--task",
        default=SUITE,
        help=f"'suite' (the synthetic held-out set: {SUITE_PER_TASK} prompts per task, {SUITE_PER_TASK * 6} "
        "in all) "
        "or a JSONL file (default suite)",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    p.add_argument(
        "--extractor",
        choices=sorted(EXTRACTORS),
        default="strip",
        help="how the answer is read from a response (default strip; gsm8k for '#### N')",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--reference",
        choices=[VANILLA, "dense", "none"],
        default=VANILLA,
        help="run to measure token agreement against (default vanilla: the untransformed model; none: skip)",
    )
    p.add_argument(
        "--json",
        default=None,
        metavar="OUT",
        help="write the figures and every example's output to this file",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_decoding_args(p)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval.evaluate import evaluate_policy
    from ..eval.jsonl_tasks import load_task
    from ..loading import load

    # Bad input fails here, before any weights load (seconds to minutes for an 8B model) and
    # before the reference run (hours at 8B scale).
    examples = load_task(args.task, args.limit)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    load_kw = check_run(args)
    policy_args = args.policy_args
    model, tokenizer = load(args.model, **load_kw)
    result, _ = evaluate_policy(
        model,
        tokenizer,
        examples,
        policy=args.policy,
        policy_args=policy_args,
        reference=None if args.reference == "none" else args.reference,
        compile=args.compile,
        batch_size=args.batch_size,
        extractor=args.extractor,
        progress=False if args.quiet else None,
        **decoding_kwargs(args),
    )
    summary = result.summary()
    print(format_report(summary, args.policy, args.reference))
    if args.json:
        report = {
            **summary,
            "policy": args.policy,
            "policy_args": policy_args,
            "reference": args.reference,
            "model": args.model,
            "task": str(args.task),
            "extractor": args.extractor,
            "batch_size": args.batch_size,
            "decoding": decoding_kwargs(args),
            "device": str(next(model.parameters()).device),
            "examples": [
                {
                    "task": ex.task,
                    "prompt": ex.prompt,
                    "answer": ex.answer,
                    "output": out,
                    "extracted": got,
                    "correct": ok,
                }
                for ex, out, got, ok in zip(examples, result.outputs, result.extracted, result.correct)
            ],
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def format_report(summary: dict, policy: str, reference: str) -> str:
    """A per-task table (exact match with its 95% Wilson interval), one line of headline
    figures and, when a reference ran, the paired comparison with it."""
    from ..eval.significance import format_accuracy, format_p

    lines = ["| task | exact match [95% CI] | n |", "|---|---|---|"]
    for task, score in summary["per_task"].items():
        lines.append(f"| {task} | {format_accuracy(score['correct'], score['n'])} | {score['n']} |")
    lines.append(f"| all | {format_accuracy(summary['correct'], summary['n'])} | {summary['n']} |")
    agreement = summary["agreement"]
    agree = "not measured" if agreement is None else f"{100 * agreement:.2f}% vs {reference}"
    lines.append(
        f"\npolicy {policy}: accuracy {format_accuracy(summary['correct'], summary['n'])}, "
        f"{summary['tokens_per_s']:.1f} tokens/s, NFE {summary['nfe']:.1f}, active fraction "
        f"{100 * summary['active_fraction']:.1f}%, token agreement {agree}"
    )
    paired = summary.get("paired")
    if paired is not None:
        lines.append(
            f"against {reference} on the same {summary['n']} prompts: {paired['won']} won, {paired['lost']} "
            "lost, "
            f"exact McNemar p = {format_p(paired['mcnemar_p'])}"
        )
    return "\n".join(lines)
