"""``dyllm bench --model diffusion_gemma:random``: DiffusionGemma's methods side by side.

A DiffusionGemma checkpoint is transformers' own model; this bench builds a small random one
(``models.diffusion_gemma.random_model``), so there is **no accuracy to report**: a random model
answers nothing. What it measures is what the transform changes: speed (generated tokens per
second, the untransformed model's time over each method's) and agreement (the fraction of
generated tokens identical to the untransformed model's, same prompts, same seed; ``dense``
and ``dyllm`` with ``every_row=True`` must reach 1.0). All methods run in one process on the
same prompts, untransformed first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

RANDOM_MODEL = "diffusion_gemma:random"
# The bench's random model: small enough for a CPU, large enough that the layers, not Python,
# take most of a step (the tests' config is far smaller). Six layers, sliding and full. Only
# what differs from ``random_config``'s sizes (4 query heads, 2 KV heads, 1 global KV head and
# 2 experts per token are the same).
BENCH_SIZES = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=6,
    head_dim=64,
    global_head_dim=128,
    num_experts=8,
    moe_intermediate_size=256,
    sliding_window=32,
    canvas_length=32,
)


@dataclass(frozen=True)
class GemmaMethod:
    label: str
    policy: str | None  # None: the untransformed model
    params: dict = field(default_factory=dict)


def default_methods(tau: float | None = None) -> list[GemmaMethod]:
    """The untransformed model, then dense, DyLLM (official preset: tau 0.99, two dense steps per
    canvas; ``tau`` overrides), DyLLM with every row salient, and the block caches (the canvas is
    the one block, the encoder's cache the prefix)."""
    dy = {} if tau is None else {"tau": tau}
    return [
        GemmaMethod("untransformed", None),
        GemmaMethod("dense", "dense"),
        GemmaMethod("dyllm", "dyllm", dy),
        GemmaMethod("dyllm: every row salient", "dyllm", {"every_row": True, "full_query_interval": 1}),
        GemmaMethod("dual_cache", "dual_cache"),
        GemmaMethod("dllm_cache", "dllm_cache"),
    ]


@dataclass
class GemmaResult:
    method: str
    tokens_per_s: float
    speedup: float
    agreement: float
    nfe: float  # decoder calls per prompt batch
    # mean over steps and layers of the canvas rows that ran the MLP, in the batch element that
    # ran the most (the engine's StepRecord.active)
    active_fraction: float


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random prompts of up to ``length`` tokens, left padded (ragged lengths)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=gen)
    mask = torch.ones_like(ids)
    for b in range(n):
        pad = int(torch.randint(0, max(1, length // 2), (1,), generator=gen))
        mask[b, :pad] = 0
        ids[b, :pad] = 0
    return ids, mask


def run_gemma_bench(
    methods: list[GemmaMethod],
    n: int = 4,
    prompt_length: int = 12,
    max_new_tokens: int = 32,
    steps: int = 8,
    seed: int = 0,
    repeats: int = 1,
    model=None,
) -> list[GemmaResult]:
    """Every method on the same random prompts; each timed ``repeats`` times (fastest kept)."""
    from ..adapters.diffusion_gemma_generation import generate_ids
    from ..models.diffusion_gemma import random_model
    from ..transform import transform

    if not methods or methods[0].policy is not None:
        raise ValueError(
            "the first method must be the untransformed model (policy None): speedups are relative to it"
        )
    model = model if model is not None else random_model(seed=seed, **BENCH_SIZES)
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    ids, mask = random_prompts(n, prompt_length, model.config.text_config.vocab_size, seed)
    results, reference, base_time = [], None, None
    for method in methods:
        runner = model if method.policy is None else transform(model, policy=method.policy, **method.params)
        best, out = float("inf"), None
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            out = generate_ids(runner, ids, mask, max_new_tokens=max_new_tokens, steps=steps, seed=seed)
            best = min(best, time.perf_counter() - start)
        responses = out.sequences[:, ids.shape[1] :]
        if reference is None:
            reference, base_time = responses, best
        records = getattr(getattr(runner, "engine", None), "records", [])
        rows = [a / r.seq_len for r in records for a in r.active if r.seq_len]
        results.append(
            GemmaResult(
                method=method.label,
                tokens_per_s=responses.numel() / best,
                speedup=base_time / best,
                agreement=float((responses == reference).float().mean()),
                nfe=float(out.stats.nfe),
                active_fraction=sum(rows) / len(rows) if rows else 1.0,
            )
        )
    return results


def format_gemma_table(results: list[GemmaResult]) -> str:
    head = f"{'method':36s} {'tokens/s':>9s} {'speedup':>8s} {'agreement':>9s} {'nfe':>5s} {'active':>7s}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.method:36s} {r.tokens_per_s:9.1f} {r.speedup:7.2f}x {r.agreement:9.3f} {r.nfe:5.0f} "
            f"{r.active_fraction:7.2f}"
        )
    lines.append(
        "random weights: no accuracy to report; agreement = tokens equal to the untransformed model's;"
    )
    lines.append(
        "active = canvas rows that ran the MLP, mean over steps and layers, in the batch element that ran "
        "the most"
    )
    return "\n".join(lines)


__all__ = [
    "BENCH_SIZES",
    "GemmaMethod",
    "GemmaResult",
    "RANDOM_MODEL",
    "default_methods",
    "format_gemma_table",
    "random_prompts",
    "run_gemma_bench",
]
