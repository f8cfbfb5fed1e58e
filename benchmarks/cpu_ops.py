"""Per-call CPU time of DyLLM's attention ops at the embedded model's decoding shapes.

    python benchmarks/cpu_ops.py [--threads 2] [--iters 300] [--rounds 5]

For ``partial_attention_stats`` (the changed rows' exact attention) and ``approx_attention``
(mode 2, every other row of a 32-row block), prints the torch reference, the lean CPU path the
op runs, the same through the registered ``dyllm::`` op (its dispatch cost on top: what a CUDA
tensor takes; CPU tensors call the plain-torch function directly), and ``cache_write_rows``
through the op and direct. Shapes: batch 16, 4 heads of 32, 99 keys with
left padding, 8 changed rows (2 of them repeats). The variants are timed round-robin over
``--rounds`` rounds; each keeps its fastest round.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.ops  # noqa: F401

import dyllm_fx.kernels.dispatch  # noqa: F401 (registers torch.ops.dyllm.*)
from dyllm_fx.kernels.approx_attention import approx_attention_fast, approx_attention_reference
from dyllm_fx.kernels.cache_scatter import cache_write_rows_reference
from dyllm_fx.kernels.partial_attention import partial_attention_stats_fast, partial_attention_stats_reference


def inputs(bsz=16, heads=4, d=32, n_keys=99, n_query=32, q_start=35, n_changed=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    changed = torch.randint(q_start, q_start + n_query, (bsz, n_changed), generator=g)
    changed[:, -2:] = changed[:, :1]  # bucket padding repeats a row
    mask = torch.ones(bsz, 1, 1, n_keys, dtype=torch.bool)
    mask[: bsz // 4, ..., :3] = False
    k, v = randn(bsz, heads, n_keys, d), randn(bsz, heads, n_keys, d)
    stats = (randn(bsz, heads, n_changed, d), k, v, changed, mask, None)
    approx = (
        randn(bsz, heads, n_query, d),
        k,
        changed,
        randn(bsz, heads, n_changed, d),
        randn(bsz, heads, n_query, d),
        changed,
        randn(bsz, heads, n_changed, d),
        mask,
        None,
        randn(bsz, heads, n_changed, d),
        randn(bsz, heads, n_query) + 3,
        torch.rand(bsz, heads, n_query, generator=g) * 10 + 1,
    )
    write = (torch.zeros(bsz, heads, n_keys), changed, randn(bsz, heads, n_changed), 2)
    return stats, approx, write, torch.arange(q_start, q_start + n_query).expand(bsz, -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    stats, approx, write, q_rows = inputs()
    ops = torch.ops.dyllm
    variants = {
        "partial_attention_stats: reference": lambda: partial_attention_stats_reference(*stats),
        "partial_attention_stats: lean CPU path": lambda: partial_attention_stats_fast(*stats),
        "partial_attention_stats: op call": lambda: ops.partial_attention_stats(*stats),
        "approx_attention mode 2: reference": lambda: approx_attention_reference(*approx, q_rows=q_rows),
        "approx_attention mode 2: lean CPU path": lambda: approx_attention_fast(*approx, q_rows=q_rows),
        "approx_attention mode 2: op call": lambda: ops.approx_attention(*approx, q_rows=q_rows),
        "cache_write_rows (B, H, L) stats: direct": lambda: cache_write_rows_reference(*write),
        "cache_write_rows (B, H, L) stats: op call": lambda: ops.cache_write_rows(*write),
    }
    best = dict.fromkeys(variants, float("inf"))
    for fn in variants.values():
        for _ in range(20):
            fn()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(args.iters):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / args.iters * 1e6)
    print(f"| op | us per call (best of {args.rounds} rounds, {args.threads} threads) |")
    print("|---|---|")
    for name, us in best.items():
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
