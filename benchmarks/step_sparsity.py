"""Time of one denoising step of the transformed model at 100/50/25/10/5% active rows, against
the untransformed model's full forward, measured side by side in one run; then the number of
inductor graph compilations one compiled generation triggers.

    python benchmarks/step_sparsity.py                        # full run (~1.5 min on 2 idle cores)
    python benchmarks/step_sparsity.py --json /tmp/step_sparsity.json
    python benchmarks/step_sparsity.py --quick                # tiny settings, a smoke test

Models:

* the embedded model (``dyllm_fx.load("default")``; a randomly initialised LLaDA of the same
  shape when the checkpoint folder is absent), seq 128 (a ~64-token prompt + gen 64), batch 1;
* an LLaDA-8B-shaped model scaled down (d_model 1024, 8 heads of 128, 8 layers, MLP 3072),
  random init, float32, seq 512 (response = the last 256 positions), batch 1, with LLaDA's
  vocabulary (126464) and with a 4096-token vocabulary, to separate the LM-head saving.

What is timed: ``model(input_ids, position_ids=...)`` (logits at every position) against
``tm.engine.step(...)`` with a warm cache, where the active rows are a seeded random subset of
the response positions (all positions at 100%) and the LM head runs on the 32 positions of the
current block, as it does inside the denoising loop. Row counts are padded to a bucket (power of
two, at least 8) by the engine, so the table gives the bucket width too. Every round times the
dense forward and every sparsity once (in a rotating order), so machine noise hits all
configurations alike; the table reports per-configuration medians over the rounds after warmup.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import dyllm_fx
from dyllm_fx.char_tokenizer import build_char_tokenizer
from dyllm_fx.models import LLaDAConfig, LLaDAModelLM
from dyllm_fx.runtime.policies import FixedPolicy, Policy, StepState
from dyllm_fx.runtime.sparse_step import bucket_size
from dyllm_fx.tasks import ALPHABET, held_out_set

FRACTIONS = (1.0, 0.5, 0.25, 0.10, 0.05)
BLOCK = 32  # positions whose logits one step computes (the current block)


# --------------------------------------------------------------------------- models


def embedded_model(n_layers: int | None = None) -> tuple[torch.nn.Module, object, str]:
    """(model, tokenizer, label): the embedded checkpoint, or a random one of its shape."""
    folder = dyllm_fx.default_model_path()
    if n_layers is None and (folder / "config.json").is_file():
        model, tok = dyllm_fx.load("default", dtype=torch.float32, device="cpu")
        return model.eval(), tok, "embedded tiny-llada"
    tok = build_char_tokenizer(ALPHABET)
    # The defaults examples/train_tiny_mdlm.py is run with for the embedded model.
    cfg = LLaDAConfig(
        d_model=128, n_heads=4, n_kv_heads=4, n_layers=n_layers or 6, mlp_hidden_size=384,
        vocab_size=len(tok), embedding_size=len(tok), max_sequence_length=256, rope_theta=10000.0,
        mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LLaDAModelLM(cfg).eval()
    if n_layers is None:
        print(f"note: {folder} does not exist; using a randomly initialised LLaDA of the embedded model's shape "
              "(d_model 128, 6 layers, 4 heads, MLP 384, vocab 44)", flush=True)
    return model, tok, f"tiny-llada (random init, {cfg.n_layers} layers)"


def scaled_model(vocab: int, quick: bool) -> tuple[torch.nn.Module, str]:
    """LLaDA-8B-shaped (head dim 128, MLP ratio 3), 8 layers of width 1024; random init."""
    if quick:
        cfg = LLaDAConfig(d_model=128, n_heads=1, n_kv_heads=1, n_layers=2, mlp_hidden_size=384,
                          vocab_size=vocab, max_sequence_length=256)
    else:
        cfg = LLaDAConfig(d_model=1024, n_heads=8, n_kv_heads=8, n_layers=8, mlp_hidden_size=3072,
                          vocab_size=vocab, max_sequence_length=1024)
    if cfg.mask_token_id >= vocab:  # keep the special ids inside a small vocabulary
        cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id = vocab - 1, vocab - 2, vocab - 2
    torch.manual_seed(0)
    model = LLaDAModelLM(cfg).eval()
    label = f"8B-shaped d{cfg.d_model} L{cfg.n_layers} vocab {vocab}"
    return model, label


# --------------------------------------------------------------------------- step timing


@dataclass
class Case:
    label: str
    seq: int
    response: int  # the last `response` positions are the response region
    block_start: int  # first position of the current block (logits are computed for BLOCK of them)


def active_rows(frac: float, seq: int, response: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted (1, k) positions: a random subset of the response region (all rows at 100%)."""
    k = max(1, round(frac * seq))
    if k >= seq:
        return torch.arange(seq)[None]
    region = torch.arange(seq - response, seq)
    picked = region[torch.randperm(response, generator=gen)[: min(k, response)]]
    if k > response:  # more rows than the response region: add prompt positions
        prompt = torch.randperm(seq - response, generator=gen)[: k - response]
        picked = torch.cat([picked, prompt])
    return picked.sort().values[None]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(model: torch.nn.Module, case: Case, fractions, warmup: int, repeats: int) -> tuple[list[dict], dict]:
    """Interleaved rounds of: dense forward, then one warm sparse step per fraction."""
    vocab = model.config.padded_vocab
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, case.seq), generator=gen)
    ids[:, case.seq - case.response :] = model.diffusion.mask_token_id
    pos = torch.arange(case.seq)[None]
    block = torch.arange(case.block_start, case.block_start + BLOCK)[None]
    rows = {f: active_rows(f, case.seq, case.response, gen) for f in fractions}

    policy = FixedPolicy(rows[fractions[0]][0])
    tm = dyllm_fx.transform(model, policy=policy)
    engine = tm.engine

    def dense():
        return model(ids, position_ids=pos)

    def sparse(f):
        policy.index = rows[f]
        return engine.step(ids, None, pos, block)

    with torch.inference_mode():
        # The first step after reset() is cold (every row); later ones are warm.
        engine.reset()
        engine.step(ids, None, pos, block)
        # Sanity: with every row active the sparse step equals the original model.
        full = dense()[:, case.block_start : case.block_start + BLOCK]
        policy.index = torch.arange(case.seq)[None]
        diff = (engine.step(ids, None, pos, block) - full).abs().max().item()
        names = ["dense", *fractions]
        samples: dict = {n: [] for n in names}
        for r in range(warmup + repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                ms = _timed(dense) if name == "dense" else _timed(lambda: sparse(name))
                if r >= warmup:
                    samples[name].append(ms)
    dense_ms = statistics.median(samples["dense"])
    out = []
    for f in fractions:
        k = int(rows[f].shape[1])
        step_ms = statistics.median(samples[f])
        out.append({
            "model": case.label, "seq": case.seq, "vocab": vocab, "n_layers": engine.n_layers,
            "active_fraction": f, "active_rows": k, "bucket": bucket_size(k, case.seq),
            "step_ms": step_ms, "untransformed_ms": dense_ms, "speedup": dense_ms / step_ms,
            "step_samples_ms": samples[f], "untransformed_samples_ms": samples["dense"],
        })
    return out, {"model": case.label, "max_abs_diff_100pct_vs_untransformed": diff}


# --------------------------------------------------------------------------- recompiles


class MaskedBlockPolicy(Policy):
    """Rows = positions of the current block still masked, plus every position whose token
    changed since the previous step (the ones unmasked at the last step); at least one row.
    Batch 1 (one row set). The active count shrinks as the block is decoded, so the bucket
    width changes over a generation: what the recompile count below exercises."""

    name = "masked-block"

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None

    def begin_step(self, state: StepState) -> None:
        super().begin_step(state)
        ids = state.input_ids
        if ids.shape[0] != 1:
            raise ValueError("MaskedBlockPolicy handles batch 1 only")
        mask_id = self.mask_token_id
        active = torch.zeros_like(ids[0], dtype=torch.bool)
        if state.block_start is not None:
            active[state.block_start : state.block_end] = ids[0, state.block_start : state.block_end] == mask_id
        if self.previous is not None and self.previous.shape == ids.shape and not state.cold:
            active |= ids[0] != self.previous[0]
        self.previous = ids.clone()
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            idx = torch.tensor([state.block_start or 0], device=ids.device)
        self.current = idx[None]

    def rows(self, layer: int, state: StepState) -> torch.Tensor:
        return self.current


def count_compiles(model, tok, gen_length: int, block_length: int, steps: int) -> dict:
    """One compiled generation; counts the graphs dynamo handed to inductor.

    ``torch._dynamo.utils.counters["stats"]["unique_graphs"]`` is incremented once per graph
    dynamo captures and compiles, i.e. once per (piece, input shapes) since the pieces are
    compiled with ``dynamic=False``: a new bucket width fails the shape guards and compiles a new
    graph (a recompile), while a width seen before reuses its graph and counts nothing. A graph
    break would show up as extra graphs (and in ``counters["graph_break"]``). Cross-check on the
    backend side: ``counters["aot_autograd"]["total"]`` counts the graphs handed to AOTAutograd
    + inductor. Some of those are served from inductor's on-disk caches (the attention pieces
    of all layers are the same graph up to their weights, and earlier runs leave entries), so
    ``fxgraph_cache_hit`` / ``_miss`` say how many were really code-generated; a cache hit still
    costs tracing and lowering set-up, and is still a compilation event.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    policy = MaskedBlockPolicy()
    policy.mask_token_id = model.diffusion.mask_token_id
    tm = dyllm_fx.transform(model, policy=policy, compile=True)
    example = max(held_out_set(1), key=lambda e: len(e.prompt))  # the longest prompt (lookup, ~66 chars)

    def snapshot():
        return (counters["stats"]["unique_graphs"], counters["aot_autograd"]["total"],
                counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"],
                sum(counters["graph_break"].values()))

    before = snapshot()
    t0 = time.perf_counter()
    out = dyllm_fx.generate(tm, tok, example.prompt, gen_length=gen_length, block_length=block_length, steps=steps)
    seconds = time.perf_counter() - t0
    after = snapshot()
    graphs, backend_compiles, hits, misses, breaks = (a - b for a, b in zip(after, before))
    seq = out.sequences.shape[1]
    records = tm.engine.records
    widths = sorted({bucket_size(a, seq) for rec in records for a in rec.active})
    n_layers = tm.engine.n_layers
    return {
        "prompt_tokens": out.prompt_length, "seq": seq, "steps": out.stats.nfe, "n_layers": n_layers,
        "pieces": 2 * n_layers + 2, "bucket_widths": widths, "active_per_step": [rec.active[0] for rec in records],
        "graph_compilations": graphs, "backend_compiles": backend_compiles, "fxgraph_cache_hit": hits,
        "fxgraph_cache_miss": misses, "graph_breaks": breaks,
        # prologue and epilogue see one shape each (all rows; the block's positions)
        "expected_compilations": 2 * n_layers * len(widths) + 2, "seconds": seconds, "text": out.texts[0],
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--quick", action="store_true", help="tiny settings: small models, 1 round, short compiled generation")
    p.add_argument("--skip-compile", action="store_true", help="skip the compiled-generation recompile count")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 1), min(args.warmup, 1)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"float32, batch 1, warmup {args.warmup} + median of {args.repeats} interleaved rounds", flush=True)

    results, checks = [], []
    model, tok, label = embedded_model(n_layers=2 if args.quick else None)
    # seq 128 = a ~64-token prompt + gen_length 64; the current block is the response's first.
    res, chk = measure(model, Case(label, 128, 64, 64), FRACTIONS, args.warmup, args.repeats)
    results += res
    checks.append(chk)
    _print_partial(res)
    vocabs = (512, 128) if args.quick else (126464, 4096)
    seq, response = (128, 64) if args.quick else (512, 256)
    for vocab in vocabs:
        big, big_label = scaled_model(vocab, args.quick)
        res, chk = measure(big, Case(big_label, seq, response, seq - response), FRACTIONS, args.warmup, args.repeats)
        results += res
        checks.append(chk)
        _print_partial(res)
        del big

    print("\n| model | active rows | step ms | untransformed ms | speedup |\n|---|---|---|---|---|")
    for r in results:
        rows = f"{100 * r['active_fraction']:g}% ({r['active_rows']}/{r['seq']}, bucket {r['bucket']})"
        print(f"| {r['model']}, seq {r['seq']} | {rows} | {r['step_ms']:.2f} | {r['untransformed_ms']:.2f} | {r['speedup']:.2f}x |")
    print("\nStep = warm engine.step with the LM head on the 32 positions of the current block; untransformed = "
          "model(input_ids) with logits at every position.")
    for c in checks:
        print(f"check ({c['model']}): 100% active step vs untransformed logits, max abs diff {c['max_abs_diff_100pct_vs_untransformed']:.2e}")

    compile_info = None
    if not args.skip_compile:
        cmodel, ctok, clabel = embedded_model(n_layers=1) if args.quick else (model, tok, label)
        gen_length, block_length, steps = (16, 8, 16) if args.quick else (64, 32, 64)
        print(f"\ncompiled generation ({clabel}, compile=True, MaskedBlockPolicy, gen_length {gen_length}, "
              f"block_length {block_length}, steps {steps}) ...", flush=True)
        compile_info = count_compiles(cmodel, ctok, gen_length, block_length, steps)
        c = compile_info
        print(f"generation: {c['steps']} steps, {len(c['bucket_widths'])} distinct row-bucket widths, "
              f"{c['graph_compilations']} graph compilations (pieces x widths)")
        print(f"  seq {c['seq']} (prompt {c['prompt_tokens']}), widths {c['bucket_widths']}, pieces {c['pieces']} "
              f"(2 x {c['n_layers']} layers + prologue + epilogue); expected 2 x {c['n_layers']} x {len(c['bucket_widths'])} "
              f"+ 2 = {c['expected_compilations']}; graphs sent to AOTAutograd/inductor {c['backend_compiles']} (FX-graph cache hits "
              f"{c['fxgraph_cache_hit']}, misses {c['fxgraph_cache_miss']}), graph breaks {c['graph_breaks']}, "
              f"{c['seconds']:.1f} s including compilation")
        print(f"  active rows per step: {c['active_per_step']}")

    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "argv": sys.argv[1:],
                       "args": vars(args), "results": results, "checks": checks, "compile": compile_info,
                       "wall_seconds": wall}, f, indent=2)


def _print_partial(res: list[dict]) -> None:
    r0 = res[0]
    parts = ", ".join(f"{100 * r['active_fraction']:g}%: {r['step_ms']:.1f} ms ({r['speedup']:.2f}x)" for r in res)
    print(f"{r0['model']}, seq {r0['seq']}: untransformed {r0['untransformed_ms']:.1f} ms; {parts}", flush=True)


if __name__ == "__main__":
    main()
