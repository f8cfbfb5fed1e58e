"""Time of one denoising step under each method at a controlled number of recomputed rows, eager
and inductor-compiled, against the untransformed forward; measured side by side in one run.

    python benchmarks/step_sparsity.py --json benchmarks/results/step_sparsity_cpu.json
    python benchmarks/step_sparsity.py --quick                # tiny settings, a smoke test

Model: LLaDA-8B's layer scaled down (d_model 1024, 8 heads of 128, MLP 3072), 8 layers, random
weights, float32, vocabulary 4096 (LLaDA's 126464 would make the full forward's LM head dominate:
the step computes logits for the 32 block positions only), batch 1, sequence 512 whose last 256
positions are the response, block 32 at the response's start.

Cases (``--fractions`` f of the 256 response rows, ``synthetic.py``):

* ``vanilla``: the untransformed forward (logits at every position), eager and compiled;
* ``dual_cache``: the block's 32 rows recomputed in every layer;
* ``rows f``: f of the response recomputed in every layer (the row-sparse path);
* ``dyllm f``: DyLLM layers, the response queried (the whole sequence every 4th step), f of it
  salient per layer, f changed tokens per step;
* ``dual_cache+dyllm f``: DyLLM layers over the block, f of the block salient;
* ``es_dllm keep f``: ES-dLLM over the block, f of it kept after layer 1.

Every case is eager; ``--compile`` adds the compiled step (``transform(compile=True)``, one
inductor graph per plan) for the fraction ``--compile-fraction``. A sample is the mean over a
group of 4 steps; the table gives medians over ``--rounds`` rounds after ``--warmup``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # noqa: E402 (run from anywhere)

import torch
from step_timing import Case, Driver, median_ms, time_cases, transform
from synthetic import RandomRows, controlled_dyllm, controlled_es_dllm, llada8b_layer_model

from dyllm_fx.models import LLaDAConfig, LLaDAModelLM

BLOCK = 32


def build_model(quick: bool) -> LLaDAModelLM:
    if quick:
        cfg = LLaDAConfig(
            d_model=64,
            n_heads=2,
            n_kv_heads=2,
            n_layers=2,
            mlp_hidden_size=128,
            vocab_size=256,
            embedding_size=256,
            max_sequence_length=256,
            mask_token_id=255,
        )
    else:
        return llada8b_layer_model(1024, 8, 4096, 4095)
    torch.manual_seed(0)
    model = LLaDAModelLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model.eval()


def cases(
    model, seq: int, response: int, fractions: list[float], compile_fraction: float | None
) -> list[Case]:
    n_layers = model.config.n_layers
    out = [Case("vanilla (eager)", model)]
    if compile_fraction is not None:
        out.append(Case("vanilla (compiled)", torch.compile(model, dynamic=False)))

    def add(label, make, changed=0, fraction=None):
        out.append(Case(f"{label} (eager)", transform(model, make(), compile=False), changed))
        if compile_fraction is not None and fraction in (None, compile_fraction):
            out.append(Case(f"{label} (compiled)", transform(model, make(), compile=True), changed))

    add("dual_cache", lambda: "dual_cache")
    for f in fractions:
        n, nb = max(1, round(f * response)), max(1, round(f * BLOCK))
        add(f"rows {f:.0%}", lambda n=n: RandomRows(n, seq, response), fraction=f)
        add(f"dyllm {f:.0%}", lambda n=n: controlled_dyllm(n), changed=n, fraction=f)
        add(
            f"dual_cache+dyllm {f:.0%}",
            lambda nb=nb: controlled_dyllm(nb, scope="block"),
            changed=nb,
            fraction=f,
        )
        add(f"es_dllm keep {f:.0%}", lambda f=f: controlled_es_dllm(f, n_layers), fraction=f)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and sequence, one round (a smoke test)")
    p.add_argument("--fractions", default="0.25,0.1,0.05")
    p.add_argument("--compile", action="store_true", help="add compiled steps for --compile-fraction")
    p.add_argument("--compile-fraction", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seq, response = (64, 32) if args.quick else (512, 256)
    if args.quick:
        args.rounds, args.warmup, args.fractions = 1, 1, "0.25"
    fractions = [float(f) for f in args.fractions.split(",")]
    model = build_model(args.quick)
    mask_id, vocab = model.diffusion.mask_token_id, model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab - 1, (1, seq), generator=g)
    ids[:, seq - response :] = mask_id
    block = (seq - response, seq - response + BLOCK)
    all_cases = cases(model, seq, response, fractions, args.compile_fraction if args.compile else None)
    drivers = [Driver(c, ids, block, seq - response, vocab, mask_id) for c in all_cases]
    with torch.inference_mode():
        for d in drivers:  # cold steps (and compiles) before any timing
            d()
    time_cases(drivers, args.rounds, args.warmup, "cpu", log=lambda m: print(m, file=sys.stderr, flush=True))
    base = median_ms(all_cases[0])
    rows = []
    for c in all_cases:
        row = {"case": c.label, "ms": median_ms(c), "speedup_vs_vanilla": base / median_ms(c)}
        if not c.vanilla:
            row["compiled_graphs"] = c.model.engine.compiler.graphs
        rows.append(row)
    shape = "tiny (d 64, 2 layers)" if args.quick else "8B-shaped d1024 L8, vocab 4096"
    print(
        f"\n{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{shape}, "
        f"seq {seq}, response {response}, block {BLOCK}, batch 1, fp32\n"
    )
    print("| step | ms | speedup vs vanilla (eager) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ms']:.2f} | {r['speedup_vs_vanilla']:.2f}x |")
    compiled = [r for r in rows if "compiled_graphs" in r and r["compiled_graphs"]]
    if compiled:
        print(
            "\ninductor graphs compiled per case (one per plan; no graph break: fullgraph=True): "
            + ", ".join(f"{r['case']}: {r['compiled_graphs']}" for r in compiled)
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "shape": shape,
                    "seq": seq,
                    "response": response,
                    "rows": rows,
                    "threads": torch.get_num_threads(),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
