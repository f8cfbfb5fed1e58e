"""``dyllm bench --model <family>:random``: every method on a small random model of one family.

A random model answers nothing, so there is **no accuracy to report**. What the bench measures is
what a method changes: speed (generated tokens per second; the untransformed model's time over
each method's) and agreement (the fraction of generated tokens equal to the untransformed
model's, same prompts, same sampler; ``dense`` and DyLLM with every row salient must reach 1.0).
A method the family cannot run is a row that says why (the adapter's
:class:`~dyllm_fx.errors.MethodNotApplicable`), not a crash.

:data:`FAMILIES` is the one registry of random models: the LLaDA-style families (``llada``,
``dream``, ``llada_moe``, ``mmada``) run ``dyllm_fx.generate``'s denoising loop here;
``diffusion_gemma`` runs its own canvas loop (:mod:`dyllm_fx.eval.diffusion_gemma_bench`);
``llada2`` runs LLaDA2's block-diffusion loop (:mod:`dyllm_fx.runtime.block_diffusion`: one prompt
at a time, in the model's own blocks, LLaDA2's threshold rule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UsageError
from .bench_rows import (
    SUFFIX,
    RandomMethod,
    RandomResult,
    check_methods,
    format_random_table,
    random_prompts,
    run_methods,
)
from .diffusion_gemma_bench import BENCH_SIZES


@dataclass(frozen=True)
class RandomFamily:
    """One family's random model: ``build(seed, **sizes)`` returns it (None: not in this build,
    and ``missing`` says why); ``sizes`` are the bench's, small enough for a CPU."""

    name: str
    build: Callable[..., nn.Module] | None
    sizes: dict = field(default_factory=dict)
    missing: str = ""


def default_methods(tau: float | None = None) -> list[RandomMethod]:
    """The untransformed model, ``dense``, the block caches, dLLM-Cache, ES-dLLM, DyLLM (official
    presets; ``tau`` overrides DyLLM's) alone and on a dual cache, and DyLLM with every row
    salient (the exactness check: the untransformed model's tokens)."""
    dy = {} if tau is None else {"tau": tau}
    return [
        RandomMethod("untransformed", None),
        RandomMethod("dense", "dense"),
        RandomMethod("prefix_cache", "prefix_cache"),
        RandomMethod("dual_cache", "dual_cache"),
        RandomMethod("dllm_cache", "dllm_cache"),
        RandomMethod("es_dllm", "es_dllm"),
        RandomMethod("dyllm", "dyllm", dy),
        RandomMethod("dual_cache+dyllm", "dual_cache+dyllm", dy),
        RandomMethod("dyllm: every row salient", "dyllm", {"every_row": True, "full_query_interval": 1}),
    ]


def randomize(model: nn.Module, seed: int, head_gain: float = 4.0) -> nn.Module:
    """Random weights for a model built with ``torch.empty`` parameters (the experts): norms 1,
    biases small, matrices N(0, 1/fan_in); the output head ``head_gain`` times wider, so that the
    logits have clear winners (agreement then measures the method, not float ties)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                fill = (
                    torch.ones(p.shape)
                    if "norm" in name or "ln_f" in name
                    else 0.02 * torch.randn(p.shape, generator=gen)
                )
            else:
                fill = torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5
                if name.endswith(("lm_head.weight", "transformer.ff_out.weight")):
                    fill = fill * head_gain
            p.copy_(fill)
    return model.eval()


def _llada(seed: int, vocab: int, hidden: int, layers: int, heads: int, mlp: int, **_) -> nn.Module:
    from ..models import LLaDAConfig, LLaDAModelLM

    cfg = LLaDAConfig(
        d_model=hidden,
        n_heads=heads,
        n_layers=layers,
        mlp_hidden_size=mlp,
        vocab_size=vocab,
        embedding_size=vocab,
        max_sequence_length=1024,
        rope_theta=10000.0,
        mask_token_id=vocab - 1,
        eos_token_id=0,
        pad_token_id=0,
    )
    return randomize(LLaDAModelLM(cfg), seed)


def _dream(seed: int, vocab: int, hidden: int, layers: int, heads: int, mlp: int, **_) -> nn.Module:
    from ..models import DreamConfig, DreamModel

    cfg = DreamConfig(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=vocab,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        mask_token_id=vocab - 1,
        eos_token_id=0,
        pad_token_id=0,
    )
    return randomize(DreamModel(cfg), seed)


def _llada_moe(
    seed: int,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    mlp: int,
    experts: int = 8,
    top_k: int = 2,
    **_,
) -> nn.Module:
    from ..models import LLaDAMoEConfig, LLaDAMoEModelLM

    cfg = LLaDAMoEConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        num_hidden_layers=layers,
        vocab_size=vocab,
        dense_intermediate_size=mlp,
        expert_intermediate_size=max(1, mlp // top_k),
        num_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        mask_token_id=vocab - 1,
        eos_token_id=0,
        pad_token_id=0,
    )
    return randomize(LLaDAMoEModelLM(cfg), seed)


def _mmada(
    seed: int, vocab: int, hidden: int, layers: int, heads: int, mlp: int, codes: int = 64, **_
) -> nn.Module:
    from ..models import MMaDAConfig, MMaDAModelLM

    cfg = MMaDAConfig(
        d_model=hidden,
        n_heads=heads,
        n_layers=layers,
        mlp_hidden_size=mlp,
        vocab_size=vocab + codes,
        embedding_size=vocab + codes,
        max_sequence_length=1024,
        rope_theta=500000.0,
        mask_token_id=vocab - 1,
        eos_token_id=0,
        pad_token_id=0,
        llm_vocab_size=vocab,
        new_vocab_size=vocab + codes,
        codebook_size=codes,
    )
    return randomize(MMaDAModelLM(cfg), seed)


def _llada2(seed: int, vocab: int, hidden: int, layers: int, heads: int, mlp: int, **_) -> nn.Module:
    from ..models.llada2 import random_model

    # the special ids outside the prompts' range (3 .. mask - 1), as the other families'
    return random_model(
        seed,
        vocab_size=vocab,
        mask_token_id=vocab - 1,
        eos_token_id=1,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=mlp,
        moe_intermediate_size=mlp // 4,
    )


def _diffusion_gemma(seed: int, **sizes) -> nn.Module:
    from ..models.diffusion_gemma import random_model

    return random_model(seed=seed, **sizes)


# The LLaDA-style families' bench sizes: the layers, not Python, take most of a step on a CPU.
_SIZES = dict(vocab=512, hidden=128, layers=4, heads=4, mlp=256)


FAMILIES: dict[str, RandomFamily] = {
    "llada": RandomFamily("llada", _llada, _SIZES),
    "dream": RandomFamily("dream", _dream, _SIZES),
    "llada_moe": RandomFamily("llada_moe", _llada_moe, _SIZES),
    "mmada": RandomFamily("mmada", _mmada, _SIZES),
    "diffusion_gemma": RandomFamily("diffusion_gemma", _diffusion_gemma, BENCH_SIZES),
    "llada2": RandomFamily("llada2", _llada2, _SIZES),
}


def family_of(model_name: str) -> RandomFamily | None:
    """The family of ``"<family>:random"`` (None for any other model name); an unknown family
    or one missing from this build is a UsageError that lists the ones there are."""
    if not model_name.endswith(SUFFIX):
        return None
    name = model_name[: -len(SUFFIX)]
    known = ", ".join(f"{n}{SUFFIX}" for n, f in FAMILIES.items() if f.build is not None)
    if name not in FAMILIES:
        raise UsageError(f"no random model {model_name!r}; dyllm bench has {known}")
    family = FAMILIES[name]
    if family.build is None:
        raise UsageError(f"{model_name}: {family.missing}. Available: {known}")
    return family


def build_random_model(family: RandomFamily, seed: int = 0, **sizes) -> nn.Module:
    """The family's random model at its bench sizes, ``sizes`` overriding them."""
    torch.manual_seed(seed)
    return family.build(seed, **{**family.sizes, **sizes})


def run_random_bench(
    family: RandomFamily,
    methods: list[RandomMethod],
    n: int = 4,
    prompt_length: int = 12,
    gen_length: int = 32,
    block_length: int = 16,
    steps: int | None = None,
    seed: int = 0,
    repeats: int = 1,
    model: nn.Module | None = None,
) -> list[RandomResult]:
    """Every method on the family's random model (or ``model``), same prompts, untransformed
    first; each timed ``repeats`` times, the fastest kept. DiffusionGemma decodes ``gen_length``
    tokens in canvases of ``steps`` steps (default 8). The first method must be the untransformed
    model (:func:`~dyllm_fx.eval.bench_rows.run_methods`)."""
    check_methods(methods)  # before the model is built
    model = model if model is not None else build_random_model(family, seed)
    if family.name == "diffusion_gemma":
        from .diffusion_gemma_bench import run_gemma_bench

        return run_gemma_bench(
            methods, n=n, max_new_tokens=gen_length, steps=steps or 8, seed=seed, repeats=repeats, model=model
        )
    if family.name == "llada2":
        return _run_block_bench(model, methods, n, prompt_length, gen_length, steps, seed, repeats)
    return _run_loop_bench(model, methods, n, prompt_length, gen_length, block_length, steps, seed, repeats)


def _mean_active_fraction(runner) -> float:
    """The rows that ran the MLP, mean over a transformed runner's steps (1.0 untransformed)."""
    rows = [r.active_fraction for r in getattr(getattr(runner, "engine", None), "records", [])]
    return sum(rows) / len(rows) if rows else 1.0


def _run_loop_bench(model, methods, n, prompt_length, gen_length, block_length, steps, seed, repeats):
    from ..generation import default_sampler, step_function
    from ..runtime.loop import denoise
    from ..runtime.schedule import BlockSchedule

    spec = model.diffusion
    ids, mask = random_prompts(n, prompt_length, spec.mask_token_id, seed)
    schedule = BlockSchedule.build(ids.shape[1], gen_length, block_length, steps or gen_length)

    def decode(runner):
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = denoise(
                step_function(runner), default_sampler(runner), spec, ids, mask, schedule, 0.0, False
            )
        return out.responses, out.stats.nfe

    return run_methods(model, methods, decode, _mean_active_fraction, repeats)


def _run_block_bench(model, methods, n, prompt_length, gen_length, steps, seed, repeats):
    """LLaDA2: each prompt decoded alone by the published block loop, in the model's blocks."""
    from ..adapters.llada2 import attention_block_length
    from ..generation import step_function
    from ..runtime.block_diffusion import BlockDiffusionSettings, generate_one

    spec = model.diffusion
    ids, mask = random_prompts(n, prompt_length, spec.mask_token_id, seed)
    settings = BlockDiffusionSettings.build(gen_length, None, steps, None, attention_block_length(model))

    def decode(runner):
        responses, nfe = [], 0
        with torch.inference_mode():
            for prompt_ids, real in zip(ids, mask.bool()):
                prompt = prompt_ids[real]
                row, stats = generate_one(step_function(runner), spec, prompt, settings)
                responses.append(row[prompt.shape[0] : prompt.shape[0] + gen_length])
                nfe += stats.nfe
        return torch.stack(responses), nfe

    return run_methods(model, methods, decode, _mean_active_fraction, repeats)


__all__ = [
    "FAMILIES",
    "RandomFamily",
    "RandomMethod",
    "RandomResult",
    "build_random_model",
    "default_methods",
    "family_of",
    "format_random_table",
    "random_prompts",
    "randomize",
    "run_random_bench",
]
