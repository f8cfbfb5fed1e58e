"""Exact-match accuracy per task of a model on the held-out synthetic suite (vanilla decoding),
each with its 95% Wilson interval.

    python benchmarks/accuracy.py                              # the embedded LLaDA model, 70 prompts per task
    python benchmarks/accuracy.py --model default-dream        # the embedded Dream-architecture model
    python benchmarks/accuracy.py --model PATH --n 20 --threshold 0.9
    python benchmarks/accuracy.py --model PATH --json new.json --against old.json   # paired with an earlier
    run

``--json`` records every prompt's outcome, so a later run on the same prompts can be compared
with it prompt by prompt (``--against``): prompts won, prompts lost and the exact McNemar p.
"""

from __future__ import annotations

import argparse
import json

import torch

import dyllm_fx
from dyllm_fx.eval.evaluate import evaluate
from dyllm_fx.eval.significance import Paired, format_accuracy, format_p
from dyllm_fx.eval.synthetic_tasks import DIFFICULTY, HELD_OUT_PER_TASK, TASKS, held_out_set


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="model folder, 'default' or 'default-dream'")
    p.add_argument(
        "--n",
        type=int,
        default=HELD_OUT_PER_TASK,
        help=f"held-out prompts per task (default {HELD_OUT_PER_TASK})",
    )
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument(
        "--alg", default=None, help="Dream sampler (default entropy; maskgit_plus with --threshold)"
    )
    p.add_argument("--batch-size", type=int, default=35)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--json", default=None, help="also write the figures and every prompt's outcome to this JSON file"
    )
    p.add_argument(
        "--against",
        default=None,
        help="a --json file of an earlier run on the same prompts: print the paired comparison with it",
    )
    args = p.parse_args()
    earlier = read_earlier(args.against) if args.against else None  # a bad file fails before the run
    if args.threads:
        torch.set_num_threads(args.threads)
    examples = held_out_set(args.n, tuple(t.strip() for t in args.tasks.split(",")))
    if earlier is not None:
        check_same_prompts(earlier, examples, args.against)
    model, tok = dyllm_fx.load(args.model, device="cpu")
    decoding = {"alg": args.alg} if args.alg else {}
    res = evaluate(
        model,
        tok,
        examples,
        batch_size=args.batch_size,
        gen_length=args.gen_length,
        block_length=args.block_length,
        steps=args.steps,
        threshold=args.threshold,
        progress=False,
        **decoding,
    )
    print("| task | difficulty | exact match [95% CI] | n |\n|---|---|---|---|")
    for task, score in res.per_task.items():
        print(
            f"| {task} | {DIFFICULTY[task]} | {format_accuracy(score.correct, score.total)} | {score.total} |"
        )
    print(f"| all | | {format_accuracy(res.n_correct, res.n)} | {res.n} |")
    solved = sum(s.accuracy >= 0.9 for s in res.per_task.values())
    print(
        f"\n{solved} of {len(res.per_task)} tasks at >= 90%; NFE {res.nfe}, {res.seconds:.1f} s, "
        f"{res.tokens_per_second:.1f} response tokens/s"
    )
    if earlier is not None:
        paired = Paired.of(res.correct, [e["correct"] for e in earlier["examples"]])
        print(
            f"against {args.against} ({earlier['model']}, "
            f"{format_accuracy(sum(e['correct'] for e in earlier['examples']), len(earlier['examples']))}): "
            f"{paired.won} prompts won, {paired.lost} lost, exact McNemar p = {format_p(paired.p_value)}"
        )
    if args.json:
        outcomes = [
            {"task": e.task, "prompt": e.prompt, "correct": ok} for e, ok in zip(examples, res.correct)
        ]
        with open(args.json, "w") as f:
            json.dump(
                {"model": args.model, **res.summary(), "args": vars(args), "examples": outcomes}, f, indent=2
            )


def read_earlier(path: str) -> dict:
    """An earlier run's --json file, checked to hold per-prompt outcomes."""
    with open(path) as f:
        earlier = json.load(f)
    if not isinstance(earlier.get("examples"), list):
        raise SystemExit(f"{path} has no per-prompt outcomes; write it with this script's --json")
    return earlier


def check_same_prompts(earlier: dict, examples, path: str) -> None:
    """A paired comparison needs the same prompts in the same order."""
    if [e["prompt"] for e in earlier["examples"]] != [e.prompt for e in examples]:
        raise SystemExit(f"{path} was measured on other prompts; rerun it with the same --n and --tasks")


if __name__ == "__main__":
    main()
