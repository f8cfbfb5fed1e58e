"""Load a dLLM, compile it into a cache-backed sparse step, and generate with it.

    python examples/transform_and_generate.py                       # the embedded model
    python examples/transform_and_generate.py --model /path/LLaDA-8B-Instruct --chat --policy dual_cache

It prints each prompt's answer from the original and from the transformed model.
"""

from __future__ import annotations

import argparse

import dyllm_fx
from dyllm_fx.eval.synthetic_tasks import held_out_set


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument(
        "--policy",
        default="dense",
        help="dense, prefix_cache, dual_cache, dyllm, es_dllm, dllm_cache, dual_cache+dyllm, ...",
    )
    p.add_argument("--chat", action="store_true", help="apply the chat template (Instruct checkpoints)")
    p.add_argument("prompts", nargs="*")
    args = p.parse_args()

    model, tokenizer = dyllm_fx.load(args.model)
    prompts = args.prompts or [e.prompt for e in held_out_set(1, tasks=("shift", "sort"))]
    fast = dyllm_fx.transform(model, policy=args.policy)
    print(dyllm_fx.explain(fast).splitlines()[0])

    base = dyllm_fx.generate(model, tokenizer, prompts, chat=args.chat)
    out = dyllm_fx.generate(fast, tokenizer, prompts, chat=args.chat)
    for prompt, a, b in zip(prompts, base.texts, out.texts):
        print(f"{prompt}\n  original:    {a}\n  transformed: {b}")
    active = [r.active_fraction for r in fast.engine.records]
    print(
        f"NFE {out.stats.nfe}, mean active rows {100 * sum(active) / len(active):.0f}%, "
        f"cache {fast.allocated_nbytes / 2**20:.2f} MiB"
    )


if __name__ == "__main__":
    main()
