"""Serving throughput and latency: N requests with Poisson arrivals against a live ``dyllm serve``,
against the same requests sent one at a time through ``generate()``.

    python benchmarks/serve.py --n 32 --rate 4 --json benchmarks/results/serve_cpu.json

For each policy (default: vanilla, dual_cache and dual_cache+dyllm at tau 0.9, the best composed
policy of the methods table):

* **served**: a ``dyllm serve`` process on 127.0.0.1 (a free port; it stops by itself after
  ``--lifetime`` seconds) gets the N requests at their arrival times, each from its own client
  thread (the ``openai`` client); latency = answer time - arrival time.
* **one at a time**: the same requests, same arrival times, decoded by ``dyllm_fx.generate`` in
  this process one after the other (first come, first served: a request waits for the previous
  one); each service time is measured, the queue is computed from them.

Throughput counts response tokens (up to EOS) per second from the first arrival to the last
answer. Prompts are the held-out prompts of every task of the embedded model, decoded with
temperature 0, so both sides decode the same tokens under exact policies (vanilla, the caches).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_POLICIES = "vanilla,dual_cache,dual_cache+dyllm:tau=0.9"


def parse_policies(spec: str) -> list[tuple[str, dict]]:
    """``"vanilla,dual_cache+dyllm:tau=0.9;num_full_steps=2"`` -> [(name, params), ...]."""
    from dyllm_fx.policy_setup import parse_policy_args

    out = []
    for item in filter(None, spec.split(",")):
        name, _, args = item.partition(":")
        out.append((name, parse_policy_args(filter(None, args.split(";")))))
    return out


def label(name: str, params: dict) -> str:
    return name + "".join(f" {k}={v}" for k, v in params.items())


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def examples(n: int) -> list:
    """``n`` held-out examples of every task (prompt and answer), shuffled."""
    from dyllm_fx.eval.synthetic_tasks import held_out_set

    pool = held_out_set(max(1, -(-n // 6)))
    random.Random(0).shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(latencies: list[float], tokens: int, span: float) -> dict:
    return {
        "tokens_per_s": tokens / span if span > 0 else 0.0,
        "p50_s": percentile(latencies, 0.5),
        "p99_s": percentile(latencies, 0.99),
        "span_s": span,
        "tokens": tokens,
    }


def run_served(name: str, params: dict, texts: list[str], times: list[float], args) -> dict:
    import openai

    from dyllm_fx.serving.process import ServerProcess

    options = ["--policy", name, "--max-num-seqs", str(args.max_num_seqs)]
    for k, v in params.items():
        options += ["--policy-arg", f"{k}={v}"]
    with ServerProcess(
        *options, threads=args.threads, lifetime_s=args.lifetime, start_timeout_s=300
    ) as server:
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=args.timeout
        )
        extra = {"block_length": args.block_length}
        client.completions.create(
            model="default", prompt=texts[0], max_tokens=args.max_tokens, extra_body=extra
        )  # warm-up
        start = time.monotonic() + 0.5

        def one(i: int):
            delay = start + times[i] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            r = client.completions.create(
                model="default", prompt=texts[i], max_tokens=args.max_tokens, extra_body=extra
            )
            return (
                time.monotonic() - (start + times[i]),
                r.usage.completion_tokens,
                r.choices[0].text,
                r.model_extra["metrics"],
            )

        with ThreadPoolExecutor(len(texts)) as pool:
            results = list(pool.map(one, range(len(texts)), timeout=args.timeout * 4))
    latencies = [r[0] for r in results]
    span = max(t + lat for t, lat in zip(times, latencies)) - times[0]
    out = summary(latencies, sum(r[1] for r in results), span)
    out["texts"] = [r[2] for r in results]
    out["nfe_mean"] = statistics.mean(r[3]["nfe"] for r in results)
    out["active_fraction_mean"] = statistics.mean(r[3]["active_fraction"] for r in results)
    return out


def run_sequential(name: str, params: dict, texts: list[str], times: list[float], args) -> dict:
    import torch

    import dyllm_fx

    torch.set_num_threads(args.threads)
    model, tok = dyllm_fx.load("default")
    if name != "vanilla":
        model = dyllm_fx.transform(model, policy=name, **params)
    kw = dict(gen_length=args.max_tokens, block_length=args.block_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # windows other than the trained one warn
        dyllm_fx.generate(model, tok, [texts[0]], **kw)  # warm-up
        clock, latencies, tokens, answers = 0.0, [], 0, []
        for t, text in zip(times, texts):
            t0 = time.perf_counter()
            answer = dyllm_fx.generate(model, tok, [text], **kw).texts[0]
            service = time.perf_counter() - t0
            clock = max(clock, t) + service
            latencies.append(clock - t)
            tokens += len(tok(answer, add_special_tokens=False)["input_ids"])
            answers.append(answer)
    out = summary(latencies, tokens, clock - times[0])
    out["texts"] = answers
    return out


def table(rows: list[dict]) -> str:
    head = (
        "| policy | served tok/s | one-at-a-time tok/s | speedup | served p50 / p99 (s) | one-at-a-time p50 "
        "/ p99 (s) "
        "| accuracy served / one-at-a-time | same text | served NFE, active |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        s, q = r["served"], r["sequential"]
        lines.append(
            f"| {r['policy']} | {s['tokens_per_s']:.1f} | {q['tokens_per_s']:.1f} | "
            f"{s['tokens_per_s'] / max(q['tokens_per_s'], 1e-9):.2f}x | {s['p50_s']:.2f} / {s['p99_s']:.2f} "
            "| "
            f"{q['p50_s']:.2f} / {q['p99_s']:.2f} | {s['accuracy']:.2f} / {q['accuracy']:.2f} | "
            f"{r['same_text']}/{len(s['texts'])} | {s['nfe_mean']:.1f}, {s['active_fraction_mean']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32, help="requests per policy")
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    p.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help=f"comma list, parameters after ':' (default {DEFAULT_POLICIES})",
    )
    p.add_argument(
        "--max-tokens", type=int, default=64, help="response window (the embedded model's trained 64)"
    )
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads, the server's and one-at-a-time's"
    )
    p.add_argument("--seed", type=int, default=0, help="the arrival times' seed")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    p.add_argument(
        "--lifetime", type=float, default=1800.0, help="each server stops by itself after this many seconds"
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    chosen = examples(args.n)
    texts, times = [e.prompt for e in chosen], arrivals(args.n, args.rate, args.seed)
    rows = []
    for name, params in parse_policies(args.policies):
        served = run_served(name, params, texts, times, args)  # the server alone on the machine first
        sequential = run_sequential(name, params, texts, times, args)
        for side in (served, sequential):
            side["accuracy"] = sum(t.strip() == e.answer for t, e in zip(side["texts"], chosen)) / len(chosen)
        same = sum(a == b for a, b in zip(served["texts"], sequential["texts"]))
        rows.append(
            {"policy": label(name, params), "served": served, "sequential": sequential, "same_text": same}
        )
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(
        f"{args.n} requests, Poisson arrivals at {args.rate}/s, max_tokens {args.max_tokens}, block "
        f"{args.block_length}, "
        f"--max-num-seqs {args.max_num_seqs}, {args.threads} thread(s)"
    )
    print(table(rows))
    if args.json:
        record = {
            "args": vars(args),
            "rows": [
                {
                    **r,
                    "served": {k: v for k, v in r["served"].items() if k != "texts"},
                    "sequential": {k: v for k, v in r["sequential"].items() if k != "texts"},
                }
                for r in rows
            ],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
