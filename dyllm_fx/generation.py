"""``dyllm_fx.generate``: prompts in, decoded responses and per-step statistics out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .models.spec import DiffusionSpec
from .runtime.loop import GenerationOutput, denoise
from .runtime.samplers import DreamSampler, LLaDASampler
from .runtime.schedule import BlockSchedule
from .runtime.step import DenseStep, StepFunction


def diffusion_spec(model: nn.Module) -> DiffusionSpec:
    spec = getattr(model, "diffusion", None)
    if not isinstance(spec, DiffusionSpec):
        raise TypeError(
            f"{type(model).__name__} has no `diffusion` spec (mask token id, logit shift). Load it with "
            "dyllm_fx.load(), or set model.diffusion = dyllm_fx.DiffusionSpec(mask_token_id=...)."
        )
    return spec


def default_sampler(model: nn.Module, **params):
    """Dream models get Dream's sampler (entropy by default), everything else LLaDA's."""
    if diffusion_spec(model).logits_shift:
        return DreamSampler(**params)
    return LLaDASampler(**params)


def step_function(model: nn.Module) -> StepFunction:
    """The model's own step (a transformed model provides one) or a full forward per step."""
    make_step = getattr(model, "make_step_function", None)
    return make_step() if callable(make_step) else DenseStep(model, diffusion_spec(model))


def generate(
    model: nn.Module,
    tokenizer,
    prompts: str | Sequence[str],
    gen_length: int = 64,
    block_length: int | None = 32,
    steps: int | None = None,
    threshold: float | None = None,
    cfg_scale: float = 0.0,
    chat: bool = False,
    stop_at_eos: bool = True,
    seed: int | None = None,
    progress: bool | None = None,
    sampler=None,
    **sampler_params,
) -> GenerationOutput:
    """Generate a response for each prompt by iterative unmasking.

    Args:
        prompts: one string or a list (a ragged batch is left padded).
        gen_length: response window length in tokens.
        block_length: semi-autoregressive block size; must divide ``gen_length``
            (``None``: one block, as Dream's reference).
        steps: total denoising steps, a multiple of the number of blocks; default
            ``gen_length`` (one token per step). Ignored under ``threshold``.
        threshold: Fast-dLLM confidence-threshold parallel decoding, in (0, 1].
        cfg_scale: LLaDA classifier-free guidance scale (0 disables).
        chat: wrap each prompt with the tokenizer's chat template (Instruct checkpoints).
        seed: seeds torch's generator for sampling with temperature > 0 or random remasking.
        sampler: a sampler object; by default LLaDA's or Dream's from the model type, built
            with ``sampler_params`` (temperature, remasking / alg, alg_temp, top_p, top_k, eps).

    Returns:
        :class:`GenerationOutput` with ``sequences``, ``texts`` (cut at the first EOS) and
        ``stats`` (NFE, seconds, per-step times and committed tokens, tokens/s).
    """
    spec = diffusion_spec(model)
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("prompts is empty; pass a string or a non-empty list of strings")
    if any(not p for p in prompts):
        raise ValueError("every prompt must be a non-empty string")
    if sampler is None:
        sampler = default_sampler(model, threshold=threshold, **sampler_params)
    elif threshold is not None or sampler_params:
        raise ValueError("pass either a sampler object or sampler parameters (threshold, temperature, ...), not both")
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    prompt_ids = enc["input_ids"].to(device)
    prompt_mask = enc["attention_mask"].to(device)
    if bool(prompt_mask.all()):
        prompt_mask = None  # no padding: let the model skip the mask entirely
    plen = prompt_ids.shape[1]
    if spec.max_length is not None and plen + gen_length > spec.max_length:
        raise ValueError(
            f"prompt ({plen} tokens) + gen_length ({gen_length}) = {plen + gen_length} exceeds the model's "
            f"window of {spec.max_length} tokens; shorten the prompt or lower gen_length"
        )
    if steps is None and threshold is None:
        steps = gen_length
    schedule = BlockSchedule.build(plen, gen_length, block_length, None if threshold is not None else steps)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = denoise(step_function(model), sampler, spec, prompt_ids, prompt_mask, schedule, cfg_scale, stop_at_eos, progress)
    out.texts = [_decode_response(tokenizer, row, spec) for row in out.responses.tolist()]
    return out


def _decode_response(tokenizer, ids: list[int], spec: DiffusionSpec) -> str:
    stops = set(spec.eos_token_ids)
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)
