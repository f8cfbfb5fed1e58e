"""DyLLM's tau (and ES-dLLM's kept fractions, dLLM-Cache's ratio) on the embedded model:
accuracy and active fraction per setting, vanilla first, in one run.

    python benchmarks/tau_sweep.py --n 24 --repeats 3 [--compile] [--json sweep.json]

The Fast-dLLM dual cache runs beside them, so each DyLLM row's speed can be read against it.
"""

from __future__ import annotations

import argparse

import dyllm_fx
from dyllm_fx.eval.methods_bench import Method, bench_examples, format_table, run_bench, write_outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=24, help="held-out prompts per task")
    p.add_argument("--tasks", default="shift,sort")
    p.add_argument("--taus", default="0.99,0.98,0.95,0.9,0.8")
    p.add_argument(
        "--repeats", type=int, default=1, help="round-robin timing passes, fastest kept (see dyllm bench)"
    )
    p.add_argument(
        "--compile", action="store_true", help="a compiled row beside each eager one (see dyllm bench)"
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tok = dyllm_fx.load("default")
    methods = [Method("vanilla", "vanilla"), Method("dual_cache", "dual_cache")]
    for tau in (float(t) for t in args.taus.split(",")):
        methods += [
            Method(f"dyllm tau={tau}", "dyllm", {"tau": tau}),
            Method(f"dual_cache+dyllm tau={tau}", "dual_cache+dyllm", {"tau": tau}),
        ]
    for steps in (((1.0, 0.0), (0.5, 0.125), (0.25, 0.25)), ((1.0, 0.0), (0.75, 0.125), (0.5, 0.25))):
        kept = "/".join(f"{p:g}" for p, _ in steps[1:])
        methods.append(Method(f"es_dllm keep {kept}", "es_dllm", {"proportion_steps": steps}))
    for ratio in (0.25, 0.5):
        methods.append(Method(f"dllm_cache ratio={ratio}", "dllm_cache", {"ratio": ratio}))
    bench = run_bench(
        model,
        tok,
        bench_examples(args.n, tuple(args.tasks.split(","))),
        methods,
        repeats=args.repeats,
        compile=args.compile,
    )
    print(format_table(bench))
    write_outputs(bench, args.json, None)


if __name__ == "__main__":
    main()
