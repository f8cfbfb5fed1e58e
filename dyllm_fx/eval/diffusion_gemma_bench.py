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

from .bench_rows import (
    RandomMethod,
    RandomResult,
    check_methods,
    format_random_table,
    random_prompts,
    run_methods,
)

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


# The rows and the table are the random-model bench's (one home for every family's random model).
GemmaMethod = RandomMethod
GemmaResult = RandomResult
format_gemma_table = format_random_table


def default_methods(tau: float | None = None) -> list[RandomMethod]:
    """The untransformed model, then dense, DyLLM (official preset: tau 0.99, two dense steps per
    canvas; ``tau`` overrides), DyLLM with every row salient, the block caches (the canvas is
    the one block, the encoder's cache the prefix), and ES-dLLM (refused: no mask token)."""
    dy = {} if tau is None else {"tau": tau}
    return [
        RandomMethod("untransformed", None),
        RandomMethod("dense", "dense"),
        RandomMethod("dyllm", "dyllm", dy),
        RandomMethod("dyllm: every row salient", "dyllm", {"every_row": True, "full_query_interval": 1}),
        RandomMethod("dual_cache", "dual_cache"),
        RandomMethod("dllm_cache", "dllm_cache"),
        RandomMethod("es_dllm", "es_dllm"),
    ]


def run_gemma_bench(
    methods: list[RandomMethod],
    n: int = 4,
    prompt_length: int = 12,
    max_new_tokens: int = 32,
    steps: int = 8,
    seed: int = 0,
    repeats: int = 1,
    model=None,
) -> list[RandomResult]:
    """Every method on the same random prompts; each timed ``repeats`` times (fastest kept); the
    first must be the untransformed model."""
    from ..adapters.diffusion_gemma_generation import generate_ids
    from ..models.diffusion_gemma import random_model

    check_methods(methods)  # before the model is built
    model = model if model is not None else random_model(seed=seed, **BENCH_SIZES)
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    ids, mask = random_prompts(n, prompt_length, model.config.text_config.vocab_size, seed)

    def decode(runner):
        out = generate_ids(runner, ids, mask, max_new_tokens=max_new_tokens, steps=steps, seed=seed)
        return out.sequences[:, ids.shape[1] :], out.stats.nfe

    def active(runner) -> float:
        records = getattr(getattr(runner, "engine", None), "records", [])
        rows = [a / r.seq_len for r in records for a in r.active if r.seq_len]
        return sum(rows) / len(rows) if rows else 1.0

    return run_methods(model, methods, decode, active, repeats)


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
