"""Exact-match accuracy per task of a model on the held-out synthetic suite (vanilla decoding),
each with its 95% Wilson interval.

    python benchmarks/accuracy.py                              # the embedded LLaDA model, 70 prompts per task
    python benchmarks/accuracy.py --model default-dream        # the embedded Dream-architecture model
    python benchmarks/accuracy.py --model PATH --n 20 --threshold 0.9
"""

from __future__ import annotations

import argparse
import json

import torch

import dyllm_fx
from dyllm_fx.evaluation import evaluate
from dyllm_fx.stats import format_accuracy
from dyllm_fx.tasks import DIFFICULTY, HELD_OUT_PER_TASK, TASKS, held_out_set


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="model folder, 'default' or 'default-dream'")
    p.add_argument("--n", type=int, default=HELD_OUT_PER_TASK, help=f"held-out prompts per task (default {HELD_OUT_PER_TASK})")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--alg", default=None, help="Dream sampler (default entropy; maskgit_plus with --threshold)")
    p.add_argument("--batch-size", type=int, default=35)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = dyllm_fx.load(args.model, device="cpu")
    decoding = {"alg": args.alg} if args.alg else {}
    tasks = tuple(t.strip() for t in args.tasks.split(","))
    res = evaluate(
        model, tok, held_out_set(args.n, tasks), batch_size=args.batch_size, gen_length=args.gen_length,
        block_length=args.block_length, steps=args.steps, threshold=args.threshold, progress=False, **decoding,
    )
    print("| task | difficulty | exact match [95% CI] | n |\n|---|---|---|---|")
    for task, score in res.per_task.items():
        print(f"| {task} | {DIFFICULTY[task]} | {format_accuracy(score.correct, score.total)} | {score.total} |")
    print(f"| all | | {format_accuracy(res.n_correct, res.n)} | {res.n} |")
    solved = sum(s.accuracy >= 0.9 for s in res.per_task.values())
    print(f"\n{solved} of {len(res.per_task)} tasks at >= 90%; NFE {res.nfe}, {res.seconds:.1f} s, "
          f"{res.tokens_per_second:.1f} response tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, **res.summary(), "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
