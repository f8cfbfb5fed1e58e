"""Scale-out figures, side by side in one run (docs/scaling.md):

* **replicas**: ``dyllm serve --replicas 1`` against ``--replicas 2`` on a local Ray instance
  (each replica one CPU thread), the same ``--n`` concurrent completions of the embedded model
  through the openai client; served response tokens per second, and the ratio.
* **tensor parallel**: one LLaDA-8B-shaped layer (d_model 4096, 32 heads, MLP 12288; a small
  vocabulary, random weights, float32) run whole in one process against two gloo ranks of
  ``tensor_parallel_size=2`` (one thread each): the median forward time over ``--seq`` rows, and
  the ratio. On a CPU this says that the sharded step runs and is exact, not that it is faster.

    python benchmarks/scale_out.py --json benchmarks/results/scale_out_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LAYER = dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=1, mlp_hidden_size=12288)


def served_tokens_per_second(replicas: int, n: int, max_tokens: int) -> dict:
    import openai

    from dyllm_fx.eval.synthetic_tasks import held_out_set
    from dyllm_fx.serving.process import ServerProcess

    prompts = [e.prompt for e in held_out_set(8)][:n]
    prompts = (prompts * (n // max(len(prompts), 1) + 1))[:n]
    with ServerProcess(
        "--policy", "dual_cache", "--replicas", str(replicas), "--cpus-per-replica", "1", start_timeout_s=600
    ) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)

        def complete(prompt: str) -> int:
            out = client.completions.create(model="default", prompt=prompt, max_tokens=max_tokens)
            return out.usage.completion_tokens

        complete(prompts[0])  # warm every path once before timing
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            tokens = sum(pool.map(complete, prompts))
        seconds = time.perf_counter() - start
    return {
        "replicas": replicas,
        "requests": n,
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
    }


def _layer_model():
    import torch

    from dyllm_fx.models import LLaDAConfig, LLaDAModelLM

    torch.manual_seed(0)
    cfg = LLaDAConfig(vocab_size=1024, embedding_size=1024, max_sequence_length=4096, **LAYER)
    return LLaDAModelLM(cfg).eval()


def _time_forward(model, seq: int, repeats: int) -> float:
    import torch

    ids = torch.randint(0, 1024, (1, seq), generator=torch.Generator().manual_seed(1))
    times = []
    with torch.no_grad():
        model(ids)
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _tp_rank(rank: int, seq: int, repeats: int, results) -> None:
    import torch

    from dyllm_fx.distributed import group_for
    from dyllm_fx.passes.tensor_parallel import shard_model

    torch.set_num_threads(1)
    shard = shard_model(_layer_model(), rank, 2, group_for(2))
    results.put((rank, _time_forward(shard, seq, repeats)))


def tensor_parallel_step(seq: int, repeats: int) -> dict:
    import torch
    import torch.multiprocessing as mp

    from dyllm_fx.distributed import spawn

    torch.set_num_threads(1)
    whole = _time_forward(_layer_model(), seq, repeats)
    results = mp.get_context("spawn").SimpleQueue()
    spawn(_tp_rank, 2, seq, repeats, results)
    sharded = max(results.get()[1] for _ in range(2))  # a step ends when the slower rank does
    return {
        "layer": LAYER,
        "rows": seq,
        "tp1_s": whole,
        "tp2_s": sharded,
        "tp2_speed_vs_tp1": whole / sharded,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32, help="concurrent completions per replica count")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seq", type=int, default=128, help="rows of the tensor-parallel forward")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", choices=["replicas", "tensor-parallel"], default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    out: dict = {}
    if args.skip != "replicas":
        one, two = (served_tokens_per_second(r, args.n, args.max_tokens) for r in (1, 2))
        out["replicas"] = {"one": one, "two": two, "two_vs_one": two["tok_s"] / one["tok_s"]}
        print(
            f"replicas: 1 -> {one['tok_s']:.1f} tok/s, 2 -> {two['tok_s']:.1f} tok/s "
            f"({out['replicas']['two_vs_one']:.2f}x), {args.n} concurrent completions"
        )
    if args.skip != "tensor-parallel":
        tp = tensor_parallel_step(args.seq, args.repeats)
        out["tensor_parallel"] = tp
        print(
            f"tensor parallel, one 8B-shaped layer, {args.seq} rows: TP1 {tp['tp1_s'] * 1e3:.0f} ms, "
            f"TP2 {tp['tp2_s'] * 1e3:.0f} ms ({tp['tp2_speed_vs_tp1']:.2f}x TP1's speed)"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
