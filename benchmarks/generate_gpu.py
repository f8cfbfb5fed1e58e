"""End-to-end generation on a GPU at LLaDA-8B layer shapes: tokens/s of the whole denoising
loop (sampler, schedule, steps), vanilla against the transformed model, side by side.

    python benchmarks/generate_gpu.py --json generate_gpu.json
    python benchmarks/generate_gpu.py --smoke                       # CPU, tiny, proves it runs

Model as in ``step_gpu.py`` (``--layers`` LLaDA-8B layers, random weights, bf16). ``--batch``
random prompts of ``--prompt-len`` tokens, ``--gen-length`` 256, block 32, one token per step,
or ``--threshold 0.9`` parallel decoding (on random weights its step counts mean little).
Methods (``--methods``): ``vanilla`` (the untransformed model, eager forward per step) and each
policy, eager and with ``cuda_graphs=True``. Each method runs once to warm up (compiles Triton
kernels, captures graphs), then ``--repeats`` timed generations; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from step_gpu import build_model

import dyllm_fx
from dyllm_fx.generation import step_function
from dyllm_fx.runtime.loop import denoise
from dyllm_fx.runtime.samplers import LLaDASampler
from dyllm_fx.runtime.schedule import BlockSchedule


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=768)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument(
        "--methods",
        default="dual_cache,prefix_cache,dyllm,dual_cache+dyllm,es_dllm,dllm_cache",
        help="comma-separated policies (vanilla always runs first)",
    )
    p.add_argument("--no-graphs", action="store_true", help="eager steps only")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.prompt_len, args.gen_length, args.block_length, args.repeats = 24, 16, 8, 1
    model = build_model(args.layers, args.smoke, device, torch.float32 if args.smoke else torch.bfloat16)
    spec = model.diffusion
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(1000, spec.mask_token_id), (args.batch, args.prompt_len), generator=g).to(
        device
    )
    steps = None if args.threshold is not None else args.gen_length
    schedule = BlockSchedule.build(args.prompt_len, args.gen_length, args.block_length, steps)

    methods = {"vanilla (eager)": model}
    for name in (m.strip() for m in args.methods.split(",") if m.strip()):
        methods[f"{name} (eager)"] = dyllm_fx.transform(model, policy=name)
        if not args.no_graphs:
            methods[f"{name} (CUDA graphs)"] = dyllm_fx.transform(model, policy=name, cuda_graphs=True)

    def run(target):
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = denoise(
                step_function(target),
                LLaDASampler(threshold=args.threshold),
                spec,
                prompt,
                None,
                schedule,
                stop_at_eos=False,
                progress=False,
            )
        sync()
        return time.perf_counter() - start, out.sequences

    rows, reference = [], None
    for label, target in methods.items():
        run(target)  # warm-up: Triton compiles, graph captures
        times, seqs = [], None
        for _ in range(args.repeats):
            seconds, seqs = run(target)
            times.append(seconds)
        reference = seqs if reference is None else reference
        sec = statistics.median(times)
        rows.append(
            {
                "method": label,
                "seconds": sec,
                "tokens_per_s": args.batch * args.gen_length / sec,
                "agreement": float((seqs == reference).float().mean()),
            }
        )
        print(f"{label}: {sec:.3f} s", file=sys.stderr, flush=True)
    base = rows[0]["tokens_per_s"]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    shape = "smoke model" if args.smoke else f"{args.layers} LLaDA-8B layers, bf16"
    decoding = f"threshold {args.threshold}" if args.threshold is not None else f"{args.gen_length} steps"
    print(
        f"\n{name}, {shape}, prompt {args.prompt_len}, gen {args.gen_length}, "
        f"block {args.block_length}, {decoding}, batch {args.batch}\n"
    )
    print(
        "| method | s / generation | tokens/s | speedup | token agreement with vanilla "
        "|\n|---|---|---|---|---|"
    )
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base
        print(
            f"| {r['method']} | {r['seconds']:.3f} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{100 * r['agreement']:.1f}% |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": name, "layers": args.layers, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
