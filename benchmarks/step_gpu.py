"""One denoising step on a GPU at LLaDA-8B layer shapes: vanilla forward against the
transformed step under each method's row pattern, measured side by side in one run.

    python benchmarks/step_gpu.py --json step_gpu.json            # CUDA, bf16
    DYLLM_TRITON=0 python benchmarks/step_gpu.py --json ...       # torch references instead of Triton
    python benchmarks/step_gpu.py --smoke                         # CPU, tiny, proves it runs

Model: LLaDA-8B's layer (d_model 4096, 32 heads of 128, MLP 12288, vocab 126464), ``--layers``
of them (default 8 of the real 32: the ratios are per layer), random weights, batch 1, sequence
``--seq`` (default 1024) whose last ``--response`` (256) positions are the response, block 32.

Timed (CUDA events around one warm step, median over ``--repeats``):

* ``vanilla``: the untransformed model's forward (logits at every position, as the reference
  decoding loop computes them);
* ``rows f``: the transformed step with a random fraction f of the sequence active at every
  layer, drawn from the response (the row-sparse path: prefix / dual cache, ES-dLLM,
  dLLM-Cache all run this way), LM head on the block;
* ``dual_cache``: the current block's 32 rows active;
* ``dyllm f``: DyLLM layers with the response queried (Q, o_proj, residual for its 256 rows),
  a random fraction f of the sequence salient (K/V, exact attention, MLP) at every layer;
* ``dual_cache+dyllm f``: the same with only the block queried.

The saliency pattern is synthetic (random rows of the given size): this measures what a step
costs for a given active fraction, not how many rows a real model marks salient (that comes
from ``dyllm bench`` on a trained model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # noqa: E402 (run from anywhere)

import torch

import dyllm_fx
from dyllm_fx.models import LLaDAConfig, LLaDAModelLM
from dyllm_fx.runtime.policies import DyLLMPolicy, Policy, StepState

BLOCK = 32


class RandomRows(Policy):
    """The same random ``n`` response rows at every layer of every warm step."""

    name = "rows"
    layer_uniform = True  # one row set for every layer, chosen before the step

    def __init__(self, n: int, seq: int, response: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.index = (seq - response + torch.randperm(response, generator=g)[:n]).sort().values

    def rows(self, layer: int, state: StepState) -> torch.Tensor:
        return self.index.to(state.input_ids.device).expand(state.input_ids.shape[0], -1)


class SyntheticDyLLM(DyLLMPolicy):
    """DyLLM layers with a fixed-size random salient set (no refresh after the first step)."""

    def __init__(self, n: int, scope: str, seed: int = 0):
        super().__init__(tau=0.99, refresh_interval=10**9, scope=scope)
        self.n, self.gen = n, torch.Generator().manual_seed(seed)

    def _pick(self, start: int, end: int, device) -> torch.Tensor:
        n = min(self.n, end - start)
        return (start + torch.randperm(end - start, generator=self.gen)[:n]).sort().values.to(device)[None]

    def begin_step(self, state: StepState) -> None:
        super().begin_step(state)
        if not self.refresh:
            self._changed = self._pick(*self._span, state.input_ids.device)

    def approx_salient(self, layer: int, cos: torch.Tensor, start: int) -> torch.Tensor:
        self._salient = self._pick(start, start + cos.shape[1], cos.device)
        return self._salient


def build_model(layers: int, smoke: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    if smoke:
        cfg = LLaDAConfig(d_model=64, n_heads=2, n_kv_heads=2, n_layers=2, mlp_hidden_size=192, vocab_size=512,
                          max_sequence_length=256, mask_token_id=500)
    else:
        cfg = LLaDAConfig(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=layers, mlp_hidden_size=12288,
                          vocab_size=126464, embedding_size=126464, max_sequence_length=4096, rope_theta=500000.0,
                          mask_token_id=126336)
    with torch.device("meta"):
        model = LLaDAModelLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def timer(device: str):
    if device == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        import time

        def run(fn):
            t = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--response", type=int, default=256)
    p.add_argument("--fractions", default="0.05,0.1,0.25")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, 1 repeat")
    p.add_argument("--json", default=None)
    p.add_argument("--compile", action="store_true", help="inductor: transform(compile=True) and torch.compile(vanilla)")
    p.add_argument("--methods", default=None, help="comma-separated label prefixes to run (default: all)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay warm steps of layer-uniform row patterns as CUDA graphs, and vanilla as a CUDA graph")
    p.add_argument("--profile", action="store_true", help="after timing, print torch.profiler tables of one step per config")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --smoke on a CPU")
    if args.smoke:
        args.seq, args.response, args.repeats, args.warmup = 96, 64, 1, 1
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = build_model(args.layers, args.smoke, device, dtype)
    seq, response = args.seq, args.response
    fractions = [float(f) for f in args.fractions.split(",")]
    mask_id = model.diffusion.mask_token_id
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(1000, mask_id), (1, seq), generator=g)
    ids[:, seq - response + BLOCK :] = mask_id
    ids = ids.to(device)
    pos = torch.arange(seq, device=device)[None]
    block = (seq - response, seq - response + BLOCK)
    logit_pos = torch.arange(*block, device=device)[None]

    methods: list[tuple[str, Policy]] = [("dual_cache (block rows)", RandomRows(BLOCK, seq, response))]
    for f in fractions:
        n = max(1, round(f * seq))
        methods += [(f"rows {f:.0%}", RandomRows(min(n, response), seq, response)),
                    (f"dyllm {f:.0%}", SyntheticDyLLM(min(n, response), "response")),
                    (f"dual_cache+dyllm {f:.0%}", SyntheticDyLLM(min(n, BLOCK), "block"))]
    if args.methods:
        wanted = tuple(m.strip() for m in args.methods.split(","))
        methods = [(label, policy) for label, policy in methods if label.startswith(wanted)]
    steps = {}
    for label, policy in methods:
        tm = dyllm_fx.transform(model, policy=policy, compile=args.compile, cuda_graphs=args.cuda_graphs)
        with torch.inference_mode():
            tm.engine.step(ids, None, pos, logit_pos, 0, block, block[0])  # cold: fills the cache
        steps[label] = (lambda tm=tm: tm.engine.step(ids, None, pos, logit_pos, 1, block, block[0]))

    forward = torch.compile(model, dynamic=False) if args.compile else model
    if args.cuda_graphs and device == "cuda":
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                forward(ids, position_ids=pos)
            torch.cuda.current_stream().wait_stream(side)
            vanilla_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(vanilla_graph):
                forward(ids, position_ids=pos)
        forward = lambda *a, **k: vanilla_graph.replay()  # noqa: E731 (static inputs: the same ids each step)

    def vanilla():
        forward(ids, position_ids=pos)

    time_ms = timer(device)
    samples = {"vanilla": [], **{k: [] for k in steps}}
    with torch.inference_mode():
        for r in range(args.warmup + args.repeats):
            for label, fn in [("vanilla", vanilla), *steps.items()]:
                ms = time_ms(fn)
                if r >= args.warmup:
                    samples[label].append(ms)
            print(f"round {r + 1}/{args.warmup + args.repeats}", file=sys.stderr, flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        for label, fn in [("vanilla", vanilla), *steps.items()]:
            with torch.inference_mode(), profile(activities=activities) as prof:
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
            print(f"\n### profile: {label}\n", flush=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = [{"config": k, "ms": med[k], "speedup_vs_vanilla": med["vanilla"] / med[k]} for k in med]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    kernels = "torch reference" if os.environ.get("DYLLM_TRITON") == "0" else "triton"
    shape = "smoke model (d 64, 2 layers), fp32" if args.smoke else f"{args.layers} LLaDA-8B layers, bf16"
    mode = "inductor-compiled pieces (and vanilla)" if args.compile else "eager"
    if args.cuda_graphs:
        mode += ", CUDA graphs (vanilla and layer-uniform steps)"
    print(f"\n{name}, {shape}, seq {seq}, response {response}, custom ops: {kernels}, {mode}\n")
    print("| step | ms | speedup vs vanilla |\n|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['ms']:.2f} | {row['speedup_vs_vanilla']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "kernels": kernels, "compiled": args.compile,
                                               "layers": args.layers, "seq": seq,
                                               "response": response, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
