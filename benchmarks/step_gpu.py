"""One denoising step on a GPU at LLaDA-8B shapes: vanilla forward against each method's step,
eager, compiled and as a CUDA graph, measured side by side in one run.

    python benchmarks/step_gpu.py --json step_gpu.json                 # CUDA, bf16, 32 layers
    python benchmarks/step_gpu.py --cuda-graphs --batch 8 --json ...   # graphed steps, batch 8
    DYLLM_TRITON=0 python benchmarks/step_gpu.py ...                   # torch ops instead of Triton
    python benchmarks/step_gpu.py --smoke                              # CPU, tiny, proves it runs

Model: LLaDA-8B (d_model 4096, 32 heads of 128, MLP 12288, vocab 126464), ``--layers`` of them
(default all 32), random weights, batch ``--batch``, prompt ``--prompt`` (512) + response
``--response`` (256), block 32. Cases (``step_cases``): vanilla, then dense, dual_cache,
prefix_cache and dllm_cache at their defaults, then as in ``step_sparsity.py`` (``synthetic.py``)
rows f, dyllm f, dual_cache+dyllm f, es_dllm keep f, with f of the response (of the block for
dual_cache+dyllm) recomputed. Also prints the weight-read bound of one step at batch 1: the
bytes of the weights a step reads over the device's memory bandwidth (``--bandwidth-gbs``,
default measured by a device-to-device copy: ``bandwidth.py``), the floor a step that reads
every weight once cannot beat.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # noqa: E402 (run from anywhere)

import torch
from bandwidth import measure_bandwidth, weight_read_bytes
from step_timing import Case, Driver, median_ms, time_cases, with_policy
from synthetic import RandomRows, controlled_dyllm, controlled_es_dllm

import dyllm_fx
from dyllm_fx.models import LLaDAConfig, LLaDAModelLM

BLOCK = 32
# the device-to-device copy that measures the memory bandwidth: far beyond a GPU's caches
COPY_BYTES = {"cuda": 2 << 30, "cpu": 32 << 20}


def build_model(layers: int, smoke: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    if smoke:
        cfg = LLaDAConfig(
            d_model=64,
            n_heads=2,
            n_kv_heads=2,
            n_layers=2,
            mlp_hidden_size=192,
            vocab_size=512,
            max_sequence_length=256,
            mask_token_id=500,
        )
    else:
        cfg = LLaDAConfig(
            d_model=4096,
            n_heads=32,
            n_kv_heads=32,
            n_layers=layers,
            mlp_hidden_size=12288,
            vocab_size=126464,
            embedding_size=126464,
            max_sequence_length=4096,
            rope_theta=500000.0,
            mask_token_id=126336,
        )
    with torch.device("meta"):
        model = LLaDAModelLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def step_inputs(model, batch: int, prompt: int, response: int, device: str):
    """Random prompt tokens followed by a masked response, (batch, prompt + response), and the
    first block's bounds."""
    mask_id = model.diffusion.mask_token_id
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(1000, mask_id), (batch, prompt + response), generator=g)
    ids[:, prompt:] = mask_id
    return ids.to(device), (prompt, prompt + BLOCK)


def step_cases(
    model,
    seq: int,
    response: int,
    fractions: list[float],
    compile: bool = False,
    cuda_graphs: bool = False,
    commits: int = 1,
    vanilla: bool = True,
    traced=None,
) -> list[Case]:
    """Every method's step: the untransformed forward (``vanilla``), the dense step, the block
    caches and dLLM-Cache at their defaults, then for each fraction f the synthetic row patterns
    of ``synthetic.py``. ``commits``: tokens committed a step (a DyLLM case makes at least that
    many rows salient, as the committed tokens' rows change). ``traced``: ``dyllm_fx.transform(model)``
    when the caller has it (tracing takes seconds; every case runs the same program)."""
    traced = traced or dyllm_fx.transform(model)

    def make(label, policy, changed=0):
        return Case(label, with_policy(traced, policy, compile=compile, cuda_graphs=cuda_graphs), changed)

    cases = [Case("vanilla", torch.compile(model, dynamic=False) if compile else model)] if vanilla else []
    cases += [make(name, name) for name in ("dense", "dual_cache", "prefix_cache", "dllm_cache")]
    for f in fractions:
        n, nb = max(1, round(f * response), commits), max(1, round(f * BLOCK), commits)
        cases += [
            make(f"rows {f:.0%}", RandomRows(n, seq, response)),
            make(f"dyllm {f:.0%}", controlled_dyllm(n), n),
            make(f"dual_cache+dyllm {f:.0%}", controlled_dyllm(nb, scope="block"), nb),
            make(f"es_dllm keep {f:.0%}", controlled_es_dllm(f, model.config.n_layers)),
        ]
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--response", type=int, default=256)
    p.add_argument("--fractions", default="0.1")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--compile", action="store_true", help="transform(compile=True) and torch.compile(vanilla)"
    )
    p.add_argument("--cuda-graphs", action="store_true", help="replay every warm step as a CUDA graph")
    p.add_argument("--methods", default=None, help="comma-separated label prefixes to run (default: all)")
    p.add_argument(
        "--bandwidth-gbs", type=float, default=None, help="memory bandwidth (default: measured by a copy)"
    )
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, 1 round")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --smoke on a CPU")
    if args.smoke:
        args.prompt, args.response, args.rounds, args.warmup = 32, 64, 1, 1
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = build_model(args.layers, args.smoke, device, dtype)
    seq, response = args.prompt + args.response, args.response
    mask_id, vocab = model.diffusion.mask_token_id, model.config.vocab_size
    ids, block = step_inputs(model, args.batch, args.prompt, args.response, device)
    fractions = [float(x) for x in args.fractions.split(",")]
    cases = step_cases(model, seq, response, fractions, args.compile, args.cuda_graphs)
    if args.methods:
        wanted = tuple(m.strip() for m in args.methods.split(","))
        cases = [cases[0]] + [c for c in cases[1:] if c.label.startswith(wanted)]
    drivers = [Driver(c, ids, block, args.prompt, vocab, mask_id) for c in cases]
    with torch.inference_mode():
        for d in drivers:
            d()
    time_cases(drivers, args.rounds, args.warmup, device, log=lambda m: print(m, file=sys.stderr, flush=True))
    base = median_ms(cases[0])
    rows = [{"case": c.label, "ms": median_ms(c), "speedup_vs_vanilla": base / median_ms(c)} for c in cases]
    weight_bytes = weight_read_bytes(model)
    if args.bandwidth_gbs is None:
        args.bandwidth_gbs = measure_bandwidth(device, COPY_BYTES[device]) / 1e9
    bound_ms = weight_bytes / (args.bandwidth_gbs * 1e9) * 1e3
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    kernels = "torch ops" if os.environ.get("DYLLM_TRITON") == "0" else "triton"
    mode = ("compiled" if args.compile else "eager") + (", CUDA graphs" if args.cuda_graphs else "")
    print(
        f"\n{name}, {model.config.n_layers} layers, {dtype}, batch {args.batch}, seq {seq}, response "
        f"{response}, {kernels}, "
        f"{mode}; weight-read bound at batch 1: {bound_ms:.2f} ms ({weight_bytes / 1e9:.1f} GB at "
        f"{args.bandwidth_gbs:.0f} GB/s, measured by a copy unless given)\n"
    )
    print("| step | ms | speedup vs vanilla | x weight-read bound |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ms']:.2f} | {r['speedup_vs_vanilla']:.2f}x | {r['ms'] / bound_ms:.2f} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": name,
                    "kernels": kernels,
                    "mode": mode,
                    "layers": args.layers,
                    "batch": args.batch,
                    "seq": seq,
                    "response": response,
                    "weight_read_bound_ms": bound_ms,
                    "rows": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
