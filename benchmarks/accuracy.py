"""Exact-match accuracy per task of a model on the held-out synthetic suite (vanilla decoding).

    python benchmarks/accuracy.py                      # embedded model, 50 prompts per task
    python benchmarks/accuracy.py --model PATH --n 20 --threshold 0.9
"""

from __future__ import annotations

import argparse
import json

import torch

import dyllm_fx
from dyllm_fx.evaluation import evaluate
from dyllm_fx.tasks import DIFFICULTY, held_out_set


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--n", type=int, default=50, help="held-out prompts per task")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = dyllm_fx.load(args.model)
    res = evaluate(
        model, tok, held_out_set(args.n), batch_size=args.batch_size, gen_length=args.gen_length,
        block_length=args.block_length, steps=args.steps, threshold=args.threshold,
    )
    print("| task | difficulty | exact match | n |\n|---|---|---|---|")
    for task, score in res.per_task.items():
        level = DIFFICULTY[task]
        print(f"| {task} | {level} | {100 * score.accuracy:.1f}% | {score.total} |")
    print(f"| all | | {100 * res.accuracy:.1f}% | {sum(s.total for s in res.per_task.values())} |")
    print(f"\nNFE {res.nfe}, {res.seconds:.1f} s, {res.tokens_per_second:.1f} response tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"per_task": {t: s.accuracy for t, s in res.per_task.items()}, "accuracy": res.accuracy,
                       "nfe": res.nfe, "seconds": res.seconds, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
