"""Where a generation's time goes, step kind by step kind: the mean time of each kind of warm step
(a plan kind and its width), its share of the run, and for DyLLM the capacity its sparse steps
ran at, measured on the embedded model.

    python benchmarks/step_kinds.py          # dual_cache, dyllm, dual_cache+dyllm, compiled
    python benchmarks/step_kinds.py --methods dyllm --eager --batch 1 --mlp-selection batch

A DyLLM sparse step gives new K/V to up to ``C`` rows per sequence, the most any sequence of
the batch needed over the last steps (plus headroom), and runs the MLP on the same rows
(``mlp_selection="sequence"``, the default) or on ``B * m`` rows picked over the whole batch
(``"batch"``: ``m`` from the batch's mean need), or picks one flat set of ``B * m`` rows per
layer for both the MLP and the next layer's K/V (``"flat"``: ``mlp_selection="batch",
kv_selection="batch"``). The capacity column counts the steps at each ``C`` (``C/m`` for the
batch-wide MLP, ``m flat`` for the flat rows): when ``C`` reaches the span's width, the step does
the dense step's attention work plus its gating.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter, defaultdict

import torch

import dyllm_fx
from dyllm_fx.eval.synthetic_tasks import held_out_set
from dyllm_fx.runtime.policies.dyllm import FLAT_ROWS, SparseKey, is_flat_key
from dyllm_fx.runtime.policies.keys import PlanKey

GEN = dict(gen_length=64, block_length=32, steps=64, progress=False)


# each --mlp-selection choice: (label, DyLLM options) of the variants it runs
SELECTIONS = {
    "sequence": [("sequence MLP rows", {"mlp_selection": "sequence"})],
    "batch": [("batch MLP rows", {"mlp_selection": "batch"})],
    "flat": [("flat rows", FLAT_ROWS)],
}
SELECTIONS["both"] = SELECTIONS["sequence"] + SELECTIONS["batch"]
SELECTIONS["all"] = SELECTIONS["both"] + SELECTIONS["flat"]


def capacity_label(key: SparseKey) -> str:
    """A DyLLM sparse key's capacity: ``C``, ``C/m`` with a batch-wide MLP capacity m, or
    ``m flat`` for one flat selection of B * m rows per layer."""
    if is_flat_key(key):
        return f"{key.capacity} flat"
    mlp = key.mlp_capacity
    return str(key.capacity) if mlp is None else f"{key.capacity}/{mlp}"


def step_label(key: PlanKey) -> tuple[str, int | None]:
    """(the plan kind, its width where the key holds one)."""
    width = getattr(key, "width", None)
    return key.kind, width if isinstance(width, int) else None


def timed_generation(fast, tokenizer, prompts: list[str], repeats: int):
    """The fastest of ``repeats`` generations after one warm-up, with the plan key of each step."""
    policy = fast.policy
    plan = policy.plan
    keys: list[PlanKey] = []

    def recording(host):
        out = plan(host)
        keys.append(out.key)
        return out

    policy.plan = recording
    try:
        dyllm_fx.generate(fast, tokenizer, prompts, **GEN)
        best = None
        for _ in range(repeats):
            keys.clear()
            out = dyllm_fx.generate(fast, tokenizer, prompts, **GEN)
            if best is None or out.stats.seconds < best[0].stats.seconds:
                best = (out, list(keys))
    finally:
        del policy.plan
    return best


def report(name: str, out, keys: list[PlanKey]) -> list[str]:
    seconds = out.stats.step_seconds
    groups: dict[tuple, list[float]] = defaultdict(list)
    capacities: dict[tuple, Counter] = defaultdict(Counter)  # capacity label -> steps
    for key, s in zip(keys, seconds):
        label = step_label(key)
        groups[label].append(s * 1e3)
        if key.kind == "sparse":
            capacities[label][capacity_label(key)] += 1
    total = sum(seconds) * 1e3
    lines = []
    for (kind, width), ms in groups.items():
        by_size = sorted(
            capacities[(kind, width)].items(),
            key=lambda item: [int(c) for c in item[0].removesuffix(" flat").split("/")],
        )
        caps = ", ".join(f"{c}: {n}" for c, n in by_size) or "-"
        lines.append(
            f"| {name} | {kind} | {'-' if width is None else width} | {len(ms)} | {statistics.mean(ms):.1f} "
            f"| {100 * sum(ms) / total:.0f}% | {caps} |"
        )
    lines.append(f"| {name} | all | | {len(seconds)} | {total / len(seconds):.1f} | 100% | |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model folder, 'default' or 'default-dream'")
    p.add_argument("--methods", default="dual_cache,dyllm,dual_cache+dyllm", help="comma-separated policies")
    p.add_argument("--n", type=int, default=3, help="held-out prompts per task (the first --batch are used)")
    p.add_argument("--batch", type=int, default=16, help="prompts decoded as one batch (default 16)")
    p.add_argument(
        "--repeats", type=int, default=2, help="timed generations after the warm-up; the fastest counts"
    )
    p.add_argument(
        "--eager", action="store_true", help="run the eager step instead of the inductor-compiled one"
    )
    p.add_argument(
        "--mlp-selection",
        choices=tuple(SELECTIONS),
        default="both",
        help="DyLLM's row selection for the dyllm methods: the MLP's per sequence (the policy's "
        "default) or batch-wide, one flat selection for the MLP and K/V ('flat'), 'both' (the first "
        "two side by side, the default) or 'all' three",
    )
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    prompts = [e.prompt for e in held_out_set(args.n)][: args.batch]
    if len(prompts) < args.batch:
        p.error(f"--n {args.n} gives {len(prompts)} prompts, fewer than --batch {args.batch}: raise --n")
    torch.set_num_threads(args.threads)
    model, tokenizer = dyllm_fx.load(args.model, dtype=torch.float32, device="cpu")
    mode = "eager" if args.eager else "compiled"
    print(f"{args.model}, batch {len(prompts)}, {mode}, {args.threads} thread(s)")
    print("| method | step kind | width | steps | mean ms | share of the run | sparse capacity: steps |")
    print("|---|---|---|---|---|---|---|")
    selections = SELECTIONS[args.mlp_selection]
    for name in methods:
        several = len(selections) > 1
        variants = [(f"{name} ({label})" if several else name, config) for label, config in selections]
        for label, config in variants if "dyllm" in name else [(name, {})]:
            fast = dyllm_fx.transform(model, policy=name, compile=not args.eager, **config)
            out, keys = timed_generation(fast, tokenizer, prompts, args.repeats)
            print("\n".join(report(label, out, keys)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
