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


def check_model_tensors(model: nn.Module) -> torch.device:
    """The one device every parameter and buffer of ``model`` lives on; raises a ValueError
    naming the odd tensors when they are spread over devices (or left on ``meta``, i.e. never
    loaded) or when the floating-point parameters mix dtypes. The runtime allocates its inputs
    and caches on one device in one dtype; a mixed model otherwise fails deep inside a step,
    or, with a meta tensor, silently produces garbage."""
    tensors = [(f"parameter {n}", t) for n, t in model.named_parameters()]
    tensors += [(f"buffer {n}", t) for n, t in model.named_buffers()]
    if not tensors:
        raise ValueError(f"{type(model).__name__} has no parameters; pass the model itself, not a wrapper without weights")
    meta = [name for name, t in tensors if t.device.type == "meta"]
    if meta:
        raise ValueError(
            f"{_preview(meta)} of {type(model).__name__} are on the meta device (never loaded). Load the weights "
            "with dyllm_fx.load(), or model.load_state_dict(state, assign=True), before generating."
        )
    devices = _group(tensors, lambda t: str(t.device))
    if len(devices) > 1:
        first = next(iter(devices))
        raise ValueError(
            f"{type(model).__name__} is spread over devices: "
            + "; ".join(f"{d}: {_preview(names)}" for d, names in devices.items())
            + f". Move it to one device, e.g. model.to({first!r})."
        )
    dtypes = _group([(n, t) for n, t in tensors if n.startswith("parameter") and t.is_floating_point()], lambda t: str(t.dtype))
    if len(dtypes) > 1:
        major = max(dtypes, key=lambda d: len(dtypes[d]))
        raise ValueError(
            f"{type(model).__name__} mixes parameter dtypes: "
            + "; ".join(f"{d}: {_preview(names)}" for d, names in dtypes.items())
            + f". Cast it to one dtype, e.g. model.to({major}), or load it with dyllm_fx.load(path, dtype=...)."
        )
    return tensors[0][1].device


def _group(named: list, key) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, t in named:
        groups.setdefault(key(t), []).append(name)
    return groups


def _preview(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown


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
    if not isinstance(prompts, Sequence) or any(not isinstance(p, str) for p in prompts):
        raise TypeError(
            f"prompts must be a string or a list of strings, got {_describe(prompts)}; decode token ids with "
            "tokenizer.decode() first, or call dyllm_fx.runtime.loop.denoise() to start from ids"
        )
    if not prompts:
        raise ValueError("prompts is empty; pass a string or a non-empty list of strings")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"every prompt must be a non-empty string; prompts {empty} are empty")
    device = check_model_tensors(model)
    if sampler is None:
        sampler = default_sampler(model, threshold=threshold, **sampler_params)
    elif threshold is not None or sampler_params:
        raise ValueError("pass either a sampler object or sampler parameters (threshold, temperature, ...), not both")
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids = enc["input_ids"].to(device)
    prompt_mask = enc["attention_mask"].to(device)
    if bool(prompt_mask.all()):
        prompt_mask = None  # no padding: let the model skip the mask entirely
    plen = prompt_ids.shape[1]
    if steps is None and threshold is None:
        steps = gen_length
    schedule = BlockSchedule.build(plen, gen_length, block_length, None if threshold is not None else steps)
    gen_length = schedule.gen_length
    if spec.max_length is not None and plen + gen_length > spec.max_length:
        raise ValueError(
            f"prompt ({plen} tokens) + gen_length ({gen_length}) = {plen + gen_length} exceeds the model's "
            f"window of {spec.max_length} tokens; shorten the prompt or lower gen_length"
        )
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = denoise(step_function(model), sampler, spec, prompt_ids, prompt_mask, schedule, cfg_scale, stop_at_eos, progress)
    out.texts = [_decode_response(tokenizer, row, spec) for row in out.responses.tolist()]
    out.stats.cache_bytes = _cache_bytes(model)
    return out


def _cache_bytes(model: nn.Module) -> int:
    """Bytes of the step caches a transformed model holds (0 for a plain model): its
    ``allocated_nbytes`` when it reports every buffer, else the step cache's size."""
    total = getattr(model, "allocated_nbytes", None)
    if isinstance(total, int):
        return total
    cache = getattr(model, "cache", None)
    return int(getattr(cache, "nbytes", 0) or 0)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape)} tensor"
    if isinstance(value, Sequence):
        odd = next(p for p in value if not isinstance(p, str))
        return f"a list holding {type(odd).__name__} {odd!r}"[:120]
    return type(value).__name__


def _decode_response(tokenizer, ids: list[int], spec: DiffusionSpec) -> str:
    stops = set(spec.eos_token_ids)
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)
