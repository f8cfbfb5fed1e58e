"""How far better row selection could take DyLLM on the embedded model: each DyLLM method at its
official defaults beside the same method with a capacity of one row per sequence (the *floor*),
against the dual cache, in one round-robin run.

    python benchmarks/dyllm_floor.py                      # compiled, batch 16, no threshold
    python benchmarks/dyllm_floor.py --threshold 0.9      # under threshold parallel decoding

The "flat rows" row is the option that comes closest to the floor at the method's semantics: one
selection per layer over the whole batch (``mlp_selection="batch", kv_selection="batch"``).

At capacity 1 a sparse step gives new K/V, exact attention and the MLP to one row per sequence;
every other row gets the approximate update. No selection of the salient rows can make a step
cheaper than that, so the floor bounds what any capacity planner (per sequence, batch-wide,
flat) can reach at the method's own semantics: the querying of the whole span, the softmax
normaliser over every key, o_proj and the gating stay. Its tokens differ from the default's
(rows the official code recomputes are approximated); the agreement column says by how much.
The floor rows with a colon also drop the normaliser pass (``cached_softmax_stats``) and, for
DyLLM alone, the whole-sequence queries (``full_query_interval=None``): the project's options.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import dyllm_fx
from dyllm_fx.eval.synthetic_tasks import held_out_set
from dyllm_fx.runtime.policies.dyllm import FLAT_ROWS

GEN = dict(gen_length=64, block_length=32, steps=64, progress=False)
FLOOR = {"capacity": 1}
LEAN = {"capacity": 1, "cached_softmax_stats": True}


def configurations(method: str) -> list[tuple[str, dict]]:
    """(label, policy options) of one DyLLM method: its defaults, the flat rows option (one
    selection over the whole batch, sized from the batch's mean need), the floor, the lean
    floor."""
    rows = [("official defaults", {}), ("flat rows", FLAT_ROWS), ("floor: capacity 1", FLOOR)]
    if "+" in method:
        rows.append(("floor: capacity 1, cached softmax stats", LEAN))
    else:
        rows.append(
            ("floor: capacity 1, cached softmax stats, frozen prompt", {**LEAN, "full_query_interval": None})
        )
    return rows


def run(models: list[tuple[str, object]], tokenizer, prompts, repeats: int, gen: dict) -> dict:
    """The fastest of ``repeats`` round-robin generations of each model after one warm-up each:
    label -> (seconds, output, step kinds of that generation)."""
    for _, model in models:
        dyllm_fx.generate(model, tokenizer, prompts, **gen)
    best: dict[str, tuple] = {}
    for _ in range(repeats):
        for label, model in models:
            out = dyllm_fx.generate(model, tokenizer, prompts, **gen)
            if label not in best or out.stats.seconds < best[label][0]:
                records = list(model.engine.records)
                best[label] = (out.stats.seconds, out, records)
    return best


def agreement(a: torch.Tensor, b: torch.Tensor, gen_length: int) -> float:
    """The fraction of the last ``gen_length`` (generated) positions where two runs decoded the
    same token."""
    return float((a[:, -gen_length:] == b[:, -gen_length:]).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model folder, 'default' or 'default-dream'")
    p.add_argument("--methods", default="dual_cache+dyllm,dyllm", help="comma-separated DyLLM policies")
    p.add_argument("--n", type=int, default=3, help="held-out prompts per task (the first --batch are used)")
    p.add_argument("--batch", type=int, default=16, help="prompts decoded as one batch (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="timed round-robin passes; the fastest counts")
    p.add_argument("--threshold", type=float, default=None, help="threshold parallel decoding for every row")
    p.add_argument("--eager", action="store_true", help="run the eager step instead of the compiled one")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if "dyllm" not in m.split("+")]
    if bad:
        p.error(f"--methods takes DyLLM policies (dyllm, dual_cache+dyllm, prefix_cache+dyllm); got {bad}")
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        p.error(f"--threshold must lie in (0, 1]; got {args.threshold}")
    prompts = [e.prompt for e in held_out_set(args.n)][: args.batch]
    if len(prompts) < args.batch:
        p.error(f"--n {args.n} gives {len(prompts)} prompts, fewer than --batch {args.batch}: raise --n")
    torch.set_num_threads(args.threads)
    model, tokenizer = dyllm_fx.load(args.model, dtype=torch.float32, device="cpu")
    compile = not args.eager
    baseline = "dual_cache"
    models = [(baseline, dyllm_fx.transform(model, policy=baseline, compile=compile))]
    for method in methods:
        for label, config in configurations(method):
            models.append(
                (f"{method} | {label}", dyllm_fx.transform(model, policy=method, compile=compile, **config))
            )
    gen = {**GEN, "threshold": args.threshold}
    best = run(models, tokenizer, prompts, args.repeats, gen)
    mode = "eager" if args.eager else "compiled"
    decoding = "" if args.threshold is None else f", threshold {args.threshold}"
    print(f"{args.model}, batch {len(prompts)}, {mode}{decoding}, {args.threads} thread(s), ", end="")
    print(f"fastest of {args.repeats}")
    columns = ["method", "configuration", "seconds", "speed vs dual_cache", "steps"]
    columns += ["median sparse step ms", "agreement with the defaults"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|")
    base = best[baseline][0]
    for label, _ in models:
        seconds, out, records = best[label]
        method, _, config = label.partition(" | ")
        sparse = [s for r, s in zip(records, out.stats.step_seconds) if r.kind == "sparse"]
        median = f"{1e3 * statistics.median(sparse):.1f}" if sparse else "-"
        reference = best.get(f"{method} | official defaults")
        agree = (
            f"{100 * agreement(out.sequences, reference[1].sequences, GEN['gen_length']):.1f}%"
            if reference
            else "-"
        )
        print(
            f"| {method} | {config or '-'} | {seconds:.2f} | {base / seconds:.2f}x | {len(records)} "
            f"| {median} | {agree} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
