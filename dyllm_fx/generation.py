"""``dyllm_fx.generate``: prompts in, decoded responses and per-step statistics out."""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .adapters import adapter_for
from .char_tokenizer import unknown_characters_message
from .errors import EmptyResponseWarning, UnknownCharactersWarning, UsageError
from .models.checks import check_model_tensors, embedding_rows
from .models.spec import DiffusionSpec
from .passes.check_bidirectional import check_not_causal_modules
from .prompts import encode_prompts
from .runtime.loop import GenerationOutput, denoise
from .runtime.samplers import DreamSampler, LLaDASampler
from .runtime.schedule import BlockSchedule
from .runtime.step import DenseStep, StepFunction
from .values import check_number, check_seed, check_token_ids


def vocabulary_size(model: nn.Module, spec: DiffusionSpec) -> int | None:
    """The token ids ``model`` reads (its embedding's rows), after checking that the spec's
    mask, EOS and pad ids are among them: an id past the embedding otherwise fails deep inside
    the first step (or reads garbage on a GPU)."""
    rows = embedding_rows(model)
    ids = {"mask_token_id": spec.mask_token_id, "pad_token_id": spec.pad_token_id}
    ids.update(
        {
            "eos_token_id" if len(spec.eos_token_ids) == 1 else f"eos_token_ids[{i}]": e
            for i, e in enumerate(spec.eos_token_ids)
        }
    )
    for name, token in ids.items():
        if token is not None:
            check_token_ids(
                f"the model's {name}",
                [token],
                rows,
                hint=f"; the diffusion spec (model.diffusion) and the model's {rows}-row embedding disagree: "
                "fix the id in config.json or in the DiffusionSpec you passed",
            )
    return rows


def diffusion_spec(model: nn.Module) -> DiffusionSpec:
    spec = getattr(model, "diffusion", None)
    if not isinstance(spec, DiffusionSpec):
        raise TypeError(
            f"{type(model).__name__} has no `diffusion` spec (mask token id, logit shift). Load a LLaDA / "
            "Dream "
            "folder with dyllm_fx.load(); wrap a transformers Llama / Qwen2 model with "
            "dyllm_fx.models.hf.bidirectional(model, mask_token_id=...), which also turns its causal "
            "attention off; "
            "for your own bidirectional module, set model.diffusion = "
            "dyllm_fx.DiffusionSpec(mask_token_id=...)."
        )
    return spec


# generate()'s own keyword arguments, for the message on an unknown one.
_GENERATE_ARGS = (
    "gen_length",
    "max_new_tokens",
    "block_length",
    "steps",
    "threshold",
    "cfg_scale",
    "chat",
    "stop_at_eos",
    "seed",
    "progress",
    "sampler",
)


def sampler_options(dream: bool) -> tuple[str, ...]:
    """The sampler keyword arguments ``generate`` takes for a Dream (or LLaDA) model."""
    cls = DreamSampler if dream else LLaDASampler
    return tuple(
        f.name
        for f in dataclasses.fields(cls)
        if f.init and not f.name.startswith("_") and f.name != "threshold"
    )


def check_sampler_params(dream: bool, params: dict) -> None:
    """Reject sampler options of the other model family and unknown keywords with the fix."""
    mine, theirs = sampler_options(dream), sampler_options(not dream)
    family, other = ("Dream", "LLaDA") if dream else ("LLaDA", "Dream")
    for key, value in params.items():
        if key in mine:
            continue
        if key in theirs:
            hint = (
                "alg= (origin, maskgit_plus, topk_margin, entropy)"
                if dream
                else "remasking= ('low_confidence' or 'random')"
            )
            raise UsageError(
                f"{key}={value!r} is a {other} sampler option, and this is a {family} model; it takes "
                f"{', '.join(mine)}: choose the order tokens are committed in with {hint}"
            )
        close = difflib.get_close_matches(key, [*_GENERATE_ARGS, *mine], n=1)
        raise UsageError(
            f"generate() got an unknown argument {key!r}"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + f" It takes {', '.join(_GENERATE_ARGS)} and, for this {family} model, the sampler options "
            f"{', '.join(mine)}"
        )
    # The numbers themselves are checked by the sampler (runtime/samplers.py), which both this
    # API and the server build.
    for key in ("remasking", "alg"):
        if key in params and not isinstance(params[key], str):
            raise TypeError(f"{key} must be a string, got {type(params[key]).__name__} {params[key]!r}")


def make_sampler(dream: bool, threshold: float | None = None, **params):
    """Dream's sampler (entropy by default) or LLaDA's, after :func:`check_sampler_params`."""
    check_sampler_params(dream, params)
    return (DreamSampler if dream else LLaDASampler)(threshold=threshold, **params)


def default_sampler(model: nn.Module, **params):
    """Dream models get Dream's sampler (entropy by default), everything else LLaDA's; the
    checkpoint's own settings (``DiffusionSpec.sampler_defaults``) apply where ``params`` are
    silent."""
    spec = diffusion_spec(model)
    return make_sampler(bool(spec.logits_shift), **{**dict(spec.sampler_defaults), **params})


def step_function(model: nn.Module) -> StepFunction:
    """The model's own step (a transformed model provides one) or a full forward per step."""
    make_step = getattr(model, "make_step_function", None)
    return make_step() if callable(make_step) else DenseStep(model, diffusion_spec(model))


def generate(
    model: nn.Module,
    tokenizer,
    prompts: str | Sequence[str],
    gen_length: int | None = None,
    block_length: int | None = 32,
    steps: int | None = None,
    threshold: float | None = None,
    cfg_scale: float = 0.0,
    chat: bool = False,
    stop_at_eos: bool = True,
    seed: int | None = None,
    progress: bool | None = None,
    sampler=None,
    max_new_tokens: int | None = None,
    **sampler_params,
) -> GenerationOutput:
    """Generate a response for each prompt by iterative unmasking.

    Args:
        prompts: one string or a list (a ragged batch is left padded).
        gen_length: response window length in tokens (default 64); ``max_new_tokens`` is the
            same thing spelled as in transformers.
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
    check_seed("seed", seed)
    adapter = adapter_for(model)
    if adapter.runs_own_loop:  # e.g. DiffusionGemma: block diffusion over canvases, its own sampler
        given = gen_length is not None or max_new_tokens is not None
        return adapter.generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=_gen_length(gen_length, max_new_tokens) if given else None,
            block_length=block_length,
            steps=steps,
            threshold=threshold,
            cfg_scale=cfg_scale,
            chat=chat,
            seed=seed,
            sampler=sampler,
            **sampler_params,
        )
    spec = diffusion_spec(model)
    gen_length = _gen_length(gen_length, max_new_tokens)
    check_number("cfg_scale", cfg_scale, minimum=0, hint="; 0 turns classifier-free guidance off")
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
    vocab = vocabulary_size(model, spec)
    if not hasattr(model, "make_step_function"):
        check_not_causal_modules(model)  # transform() checks the graph itself
    if sampler is None:
        sampler = default_sampler(model, threshold=threshold, **sampler_params)
    elif threshold is not None or sampler_params:
        raise ValueError(
            "pass either a sampler object or sampler parameters (threshold, temperature, ...), not both"
        )
    texts, prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, chat, device)
    if vocab is not None and prompt_ids.numel() and int(prompt_ids.max()) >= vocab:
        check_token_ids(
            "the encoded prompt",
            prompt_ids[(prompt_ids >= vocab).any(dim=-1)][0].tolist(),
            vocab,
            hint="; the tokenizer knows more tokens than the model: pass the tokenizer that came with it",
        )
    unknown = unknown_characters_message(tokenizer, texts, prompt_ids)
    if unknown:
        warnings.warn(unknown, UnknownCharactersWarning, stacklevel=2)
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
    window = spec.trained_gen_length
    if window is not None and gen_length != window:
        warnings.warn(
            f"the model was trained with a {window}-token response window (its folder's training.json), and "
            f"gen_length={gen_length} differs: outside that window it usually decodes an empty or wrong "
            "answer. "
            f"Use gen_length={window} (dyllm: --gen-length {window}).",
            EmptyResponseWarning,
            stacklevel=2,
        )
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = denoise(
            step_function(model),
            sampler,
            spec,
            prompt_ids,
            prompt_mask,
            schedule,
            cfg_scale,
            stop_at_eos,
            progress,
        )
    rows = out.responses.tolist()
    out.texts = [_decode_response(tokenizer, row, spec) for row in rows]
    if window is None or gen_length == window:
        _warn_on_cut_responses(out.texts, rows, spec, tokenizer)
    out.stats.cache_bytes = _cache_bytes(model)
    return out


def _gen_length(gen_length, max_new_tokens) -> int:
    """``gen_length`` or its transformers spelling ``max_new_tokens`` (default 64)."""
    if max_new_tokens is not None:
        if gen_length is not None and gen_length != max_new_tokens:
            raise UsageError(
                f"gen_length={gen_length} and max_new_tokens={max_new_tokens} disagree; they are the same "
                "setting, pass one"
            )
        return max_new_tokens
    return 64 if gen_length is None else gen_length


def _warn_on_cut_responses(texts: list[str], rows: list[list[int]], spec: DiffusionSpec, tokenizer) -> None:
    """Warn when a response is empty because it starts with EOS, yet real tokens follow that
    EOS: the text is cut there, and the user otherwise sees an empty line and nothing else."""
    skip = {
        *spec.eos_token_ids,
        spec.mask_token_id,
        spec.pad_token_id,
        getattr(tokenizer, "pad_token_id", None),
    }
    cut = [
        i for i, (text, row) in enumerate(zip(texts, rows)) if not text and any(t not in skip for t in row)
    ]
    if cut:
        warnings.warn(
            f"response(s) {cut} are empty: the model decoded EOS first and real tokens after it (texts stop "
            "at the first "
            "EOS; out.sequences holds every token). Check gen_length / block_length against what the model "
            "was "
            "trained with, and the prompt format.",
            EmptyResponseWarning,
            stacklevel=3,
        )


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
