"""DiffusionGemma (transformers' ``DiffusionGemmaForBlockDiffusion``): the model-side helpers.

The model itself is transformers'; this module holds what only needs the model: the decoder
call every caller makes (the trace, the canvas loop) and small random models for tests and
benchmarks. What connects it to the passes and the runtime is its adapter,
``dyllm_fx.adapters.diffusion_gemma``.
"""

from __future__ import annotations

import torch
from torch import nn


def decode_canvas(
    model: nn.Module,
    canvas: torch.Tensor,
    cache,
    self_conditioning_logits: torch.Tensor | None,
    decoder_attention_mask,
    position_ids: torch.Tensor | None,
    self_conditioning_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoder call of ``model`` on the canvas (B, C) over the encoder ``cache``: logits (B, C, V)."""
    out = model(
        decoder_input_ids=canvas,
        cache=cache,
        self_conditioning_logits=self_conditioning_logits,
        self_conditioning_mask=self_conditioning_mask,
        decoder_attention_mask=decoder_attention_mask,
        decoder_position_ids=position_ids,
    )
    return out.logits


# --- small random models (tests, benchmarks: random weights have no accuracy to report) -----------


def random_config(**text_overrides):
    """A small DiffusionGemma config: every size scaled down, sliding and full layers, a mixture
    of experts, a small canvas. ``text_overrides`` update the text config; ``canvas_length``
    goes to the outer config."""
    from transformers import DiffusionGemmaConfig

    canvas = text_overrides.pop("canvas_length", 8)
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=16,
        sliding_window=6,
        max_position_embeddings=512,
        layer_types=None,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    text.update(text_overrides)
    if text["layer_types"] is None:  # alternate, ending on a full layer (transformers requires it)
        n = text["num_hidden_layers"]
        text["layer_types"] = [
            "full_attention" if (n - 1 - i) % 2 == 0 else "sliding_attention" for i in range(n)
        ]
    vision = dict(
        model_type="gemma4_vision",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
    )
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas)
    config._attn_implementation = "sdpa"
    return config


def random_model(seed: int = 0, dtype: torch.dtype = torch.float32, **text_overrides):
    """A DiffusionGemmaForBlockDiffusion with random weights (transformers' own initialisation)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    config = random_config(**text_overrides)
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(config).eval().to(dtype)


__all__ = ["decode_canvas", "random_config", "random_model"]
