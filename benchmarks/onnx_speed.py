"""Tokens/s of each exported policy under onnxruntime (CPU) against the torch engine, eager and
inductor-compiled, measured side by side in one run on the embedded model.

    python benchmarks/onnx_speed.py --json benchmarks/results/onnx_speed_cpu.json
    python benchmarks/onnx_speed.py --quick          # two policies, two prompts: a smoke test

For each policy: the transformed model decodes the prompts once eagerly (the reference tokens,
and the plan keys its steps meet: ``record_plan_keys``); ``to_onnx`` exports those keys (with
``--full-layout``, every key the layout can reach instead); then the three runners decode the
same prompts, ``--repeats`` times after one warm-up (which also compiles), and the table gives
the median tokens/s (``GenerationStats.tokens_per_second``: batch x gen_length / seconds) and
whether onnxruntime's tokens equal the eager engine's. torch and onnxruntime get the same
thread count (``--threads``).

Decoding: gen_length 64, block_length 32, 64 steps (the embedded model's settings, docs/models.md),
temperature 0, batches of ``--batch`` held-out prompts of mixed lengths (left-padded).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import dyllm_fx
from dyllm_fx.eval.synthetic_tasks import held_out_set
from dyllm_fx.export import load_onnx, record_plan_keys, to_onnx
from dyllm_fx.export.step_module import is_layer_uniform

POLICIES = ["dual_cache", "dyllm", "es_dllm", "dllm_cache", "dual_cache+dyllm"]
GEN = dict(gen_length=64, block_length=32, steps=64, progress=False)


def batches(prompts: list[str], size: int) -> list[list[str]]:
    return [prompts[i : i + size] for i in range(0, len(prompts), size)]


def decode(model, tokenizer, groups: list[list[str]]) -> tuple[list[torch.Tensor], float]:
    """The sequences of every batch and the tokens/s over all of them."""
    seqs, seconds, tokens = [], 0.0, 0
    for prompts in groups:
        out = dyllm_fx.generate(model, tokenizer, prompts, **GEN)
        seqs.append(out.sequences)
        seconds += out.stats.seconds
        tokens += len(prompts) * GEN["gen_length"]
    return seqs, tokens / seconds


def timed(model, tokenizer, groups, repeats: int) -> tuple[list[torch.Tensor], float]:
    """Median tokens/s over ``repeats`` runs after one warm-up run."""
    seqs, _ = decode(model, tokenizer, groups)
    rates = [decode(model, tokenizer, groups)[1] for _ in range(repeats)]
    return seqs, statistics.median(rates)


def run_policy(name: str, model, tokenizer, groups, args, folder: Path) -> dict:
    eager = dyllm_fx.transform(model, policy=name)
    uniform = is_layer_uniform(eager.policy)
    with record_plan_keys(eager) as keys:
        reference, _ = decode(eager, tokenizer, groups)
    path = folder / f"{name.replace('+', '_')}.onnx"
    start = time.perf_counter()
    layout = dict(gen_length=GEN["gen_length"], block_length=GEN["block_length"], steps=GEN["steps"])
    export_s = None
    if not (args.reuse and path.is_file()):
        if uniform:
            to_onnx(eager, path, model_path="default")
        else:
            to_onnx(
                eager, path, model_path="default", keys=None if args.full_layout else list(keys), **layout
            )
        export_s = time.perf_counter() - start
    onnx_model = load_onnx(path, device="cpu", threads=args.threads)
    keys_n = None if uniform else len(onnx_model.info.plans)
    graphs = 1 if uniform else len(onnx_model.info.branches)
    _, eager_tps = timed(eager, tokenizer, groups, args.repeats)
    got, ort_tps = timed(onnx_model, tokenizer, groups, args.repeats)
    compiled_tps = None
    if not args.no_compile:  # last: inductor compiles one graph per plan key in the warm-up run
        compiled = dyllm_fx.transform(model, policy=name, compile=True)
        _, compiled_tps = timed(compiled, tokenizer, groups, args.repeats)
    same = sum(int(torch.equal(a[i], b[i])) for a, b in zip(got, reference) for i in range(a.shape[0]))
    total = sum(a.shape[0] for a in got)
    return {
        "policy": name,
        "plan_keys": keys_n,
        "graphs": graphs,
        "export_s": export_s,
        "onnx_mib": path.stat().st_size / 2**20,
        "eager_tps": eager_tps,
        "compiled_tps": compiled_tps,
        "ort_tps": ort_tps,
        "same_tokens": f"{same}/{total}",
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| policy | plan keys | step graphs | export (s) | file (MiB) | torch eager tok/s "
        "| torch compiled tok/s | onnxruntime tok/s | ort / eager | ort tokens = eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        compiled = "-" if r["compiled_tps"] is None else f"{r['compiled_tps']:.1f}"
        lines.append(
            f"| {r['policy']} | {r.get('plan_keys') or '-'} | {r['graphs']} | "
            f"{'-' if r['export_s'] is None else format(r['export_s'], '.0f')} | {r['onnx_mib']:.1f} | "
            f"{r['eager_tps']:.1f} "
            f"| {compiled} | {r['ort_tps']:.1f} | {r['ort_tps'] / r['eager_tps']:.2f}x | {r['same_tokens']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--policies", default=",".join(POLICIES), help=f"comma list (default {','.join(POLICIES)})"
    )
    p.add_argument("--n", type=int, default=1, help="held-out prompts per task (7 tasks; default 1)")
    p.add_argument("--batch", type=int, default=6, help="prompts per generate() call (default 6)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after the warm-up (default 2)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (default 1)"
    )
    p.add_argument("--no-compile", action="store_true", help="skip the inductor-compiled torch engine")
    p.add_argument(
        "--full-layout",
        action="store_true",
        help="export every plan key the layout can reach, not only those the prompts meet",
    )
    p.add_argument("--out", default=None, help="folder for the .onnx files (default: a temporary one)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="time the .onnx files already in --out instead of exporting again (no export time)",
    )
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.add_argument(
        "--quick", action="store_true", help="dual_cache and dyllm on 2 prompts, 1 repeat, no compile"
    )
    args = p.parse_args(argv)
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    if args.quick:
        policies, args.n, args.repeats, args.no_compile = ["dual_cache", "dyllm"], 1, 1, True
    torch.set_num_threads(args.threads)
    model, tokenizer = dyllm_fx.load("default", dtype=torch.float32, device="cpu")
    prompts = [e.prompt for e in held_out_set(args.n)]
    if args.quick:
        prompts = prompts[:2]
    groups = batches(prompts, args.batch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in policies:
            print(f"{name}...", file=sys.stderr, flush=True)
            rows.append(run_policy(name, model, tokenizer, groups, args, folder))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            if args.json:  # after every policy: a long run stopped midway keeps its rows
                write_json(args.json, header(prompts, args), args, rows)
    print(header(prompts, args))
    print(table(rows))
    return 0


def header(prompts: list[str], args) -> str:
    import onnxruntime

    return (
        f"{len(prompts)} prompts in batches of {args.batch}, {args.threads} thread(s), torch "
        f"{torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}"
    )


def write_json(path: str, setup: str, args, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"setup": setup, "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
