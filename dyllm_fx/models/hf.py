"""Run a transformers decoder (Llama, Qwen2, ...) bidirectionally, as a masked diffusion LM.

``bidirectional(model, mask_token_id)`` wraps an ``AutoModelForCausalLM``-style model so that
``wrapper(input_ids, attention_mask, position_ids)`` returns logits computed with full
(non-causal) attention: each attention module's ``is_causal`` is switched off and the 2-D
padding mask is passed as an explicit 4-D mask that hides padded keys only. The wrapper has a
``diffusion`` spec, so ``dyllm_fx.generate`` and ``dyllm_fx.transform`` take it directly.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import default_position_ids
from .spec import DiffusionSpec


class BidirectionalLM(nn.Module):
    def __init__(self, model: nn.Module, spec: DiffusionSpec):
        super().__init__()
        impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
        if impl not in ("sdpa", None):
            raise ValueError(
                f"model uses attn_implementation={impl!r}; load it with attn_implementation='sdpa' so the "
                "compiler sees attention as one op"
            )
        self.model = model
        self.diffusion = spec
        for module in model.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        bsz, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        # (B, 1, L, L): every query sees every real key; a 4-D mask is used as given.
        mask4 = attention_mask.bool()[:, None, None, :].expand(bsz, 1, seq, seq)
        out = self.model(
            input_ids=input_ids, attention_mask=mask4, position_ids=position_ids, use_cache=False
        )
        return out.logits


def bidirectional(
    model: nn.Module, mask_token_id: int, eos_token_ids: tuple[int, ...] = (), logits_shift: int = 0
) -> BidirectionalLM:
    """Wrap a transformers causal LM to run with full attention as a diffusion LM."""
    cfg = getattr(model, "config", None)
    spec = DiffusionSpec(
        mask_token_id=mask_token_id,
        eos_token_ids=tuple(eos_token_ids),
        logits_shift=logits_shift,
        max_length=getattr(cfg, "max_position_embeddings", None),
    )
    return BidirectionalLM(model, spec).eval()
