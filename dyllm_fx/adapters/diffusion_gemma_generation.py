"""DiffusionGemma generation with this project's sampler (``runtime/canvas.py``).

The canvas loop calls the model three ways (:class:`DiffusionGemmaCalls`), the same for the
untransformed model and a transformed one, which share transformers' calling convention.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ..models.checks import check_model_tensors
from ..models.diffusion_gemma import decode_canvas
from ..prompts import encode_prompts
from ..runtime.canvas import CanvasSettings, generate_canvases


class DiffusionGemmaCalls:
    """The three model calls of the canvas loop (``runtime.canvas.CanvasModel``), the same for
    the untransformed model and a transformed one (they share transformers' calling
    convention): the encoder and the mask helpers are transformers' own."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.vocab_size = model.config.text_config.vocab_size
        self.canvas_length = model.config.canvas_length
        self.logits_dtype = model.model.decoder.embed_tokens.weight.dtype

    def new_cache(self, batch: int):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.get_text_config(decoder=True))

    def encode(self, ids, attention_mask, position_ids, cache):
        encoder = self.model.model.encoder
        dummy = torch.empty((ids.shape[0], ids.shape[1], 0), dtype=self.model.dtype, device=ids.device)
        masks = encoder.create_masks_for_generate(
            config=self.model.config,
            inputs_embeds=dummy,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        return encoder(input_ids=ids, attention_mask=masks, cache=cache, position_ids=position_ids).cache

    def decoder_masks(self, canvas, cache, decoder_attention_mask):
        return self.model.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.model.config,
            inputs_embeds=canvas.unsqueeze(-1),
            cache=cache,
            decoder_attention_mask=decoder_attention_mask,
        )

    def decode(self, canvas, sc_logits, masks, cache, position_ids):
        return decode_canvas(self.model, canvas, cache, sc_logits, masks, position_ids)


SAMPLER_OPTIONS = (
    "entropy_bound",
    "t_min",
    "t_max",
    "stability_threshold",
    "confidence_threshold",
    "eos_token_id",
    "pad_token_id",
)


def generate_ids(
    model: nn.Module, input_ids, attention_mask=None, max_new_tokens=None, steps=None, seed=None, **options
):
    """DiffusionGemma generation from token ids with ``runtime.canvas``'s sampler (the settings of
    the model's generation config, then ``options``: see ``SAMPLER_OPTIONS``)."""
    unknown = sorted(set(options) - set(SAMPLER_OPTIONS))
    if unknown:
        raise UsageError(
            f"unknown DiffusionGemma sampler option(s) {unknown}; it takes max_new_tokens, steps "
            "(max_denoising_steps), "
            f"seed and {', '.join(SAMPLER_OPTIONS)}"
        )
    eos = options.pop("eos_token_id", None)
    settings = CanvasSettings.from_generation_config(
        model.generation_config,
        max_new_tokens=max_new_tokens,
        max_denoising_steps=steps,
        eos_token_ids=eos,
        **options,
    )
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = generate_canvases(DiffusionGemmaCalls(model), input_ids, attention_mask, settings)
    out.stats.cache_bytes = int(getattr(model, "allocated_nbytes", 0) or 0)
    return out


def generate(
    model: nn.Module,
    tokenizer,
    prompts,
    max_new_tokens=None,
    block_length=None,
    steps=None,
    threshold=None,
    cfg_scale=0.0,
    chat=False,
    seed=None,
    sampler=None,
    **sampler_params,
):
    """``dyllm_fx.generate`` for DiffusionGemma (untransformed or transformed): transformers'
    generation semantics with ``runtime.canvas``'s entropy-bound sampler. The block is the
    model's canvas; ``steps`` is the most denoising steps per canvas; ``max_new_tokens`` None
    takes the model's generation config."""
    canvas = model.config.canvas_length
    if block_length not in (None, 32, canvas):
        raise UsageError(
            f"DiffusionGemma decodes canvases of {canvas} tokens (config.canvas_length); drop block_length"
        )
    for name, value, unset in (
        ("threshold", threshold, None),
        ("cfg_scale", cfg_scale, 0.0),
        ("sampler", sampler, None),
    ):
        if value != unset:
            raise UsageError(
                f"{name}= does not apply to DiffusionGemma, whose sampler accepts tokens by an entropy "
                "bound; it takes "
                f"{', '.join(SAMPLER_OPTIONS)}"
            )
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or any(not isinstance(p, str) or not p for p in prompts):
        raise ValueError("prompts must be a non-empty string or a list of non-empty strings")
    device = check_model_tensors(model)
    _, ids, mask = encode_prompts(tokenizer, prompts, chat, device)
    out = generate_ids(
        model, ids, mask, max_new_tokens=max_new_tokens, steps=steps, seed=seed, **sampler_params
    )
    eos, pad = set(out.settings.eos_token_ids), out.settings.pad_token_id
    texts = []
    for row in out.responses.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tokenizer.decode([t for t in row[:cut] if t != pad], skip_special_tokens=True))
    out.texts = texts
    return out


__all__ = ["DiffusionGemmaCalls", "SAMPLER_OPTIONS", "generate", "generate_ids"]
