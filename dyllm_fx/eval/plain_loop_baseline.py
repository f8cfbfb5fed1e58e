"""Fast-dLLM's block caches written as its reference implementation writes them: a plain loop
over the model's layers, no compiler and no engine. ``dyllm bench`` times it beside the
compiled ``dual_cache`` / ``prefix_cache`` policies (the "plain loop" rows), to show what the
engine's step costs against the simplest correct code.

At the first step of a block every row runs (a full forward that keeps each layer's K and V);
at the block's other steps only the block's rows (``dual``) or the block and everything after it
(``prefix``) run through the layers, their new K/V written over the cached ones, attending over
the whole cache; the LM head runs on the block. The same tokens as the ``dual_cache`` /
``prefix_cache`` policies (``tests/test_baselines.py``).

Supports the project's LLaDA and Dream modules (``dyllm_fx.models``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import DreamModel, LLaDAModelLM
from ..models.layers import apply_rope, key_padding_mask, rope_cos_sin
from ..runtime.step import StepRequest

MODES = ("dual", "prefix")


def _layers(model: nn.Module):
    """(embedding, [(norm1, q, k, v, o, norm2, gate, up, down)], final norm, head (None: tied),
    config)."""
    if isinstance(model, LLaDAModelLM):
        t, cfg = model.model.transformer, model.config
        blocks = [
            (b.attn_norm, b.q_proj, b.k_proj, b.v_proj, b.attn_out, b.ff_norm, b.ff_proj, b.up_proj, b.ff_out)
            for b in t.blocks
        ]
        return (
            t.wte,
            blocks,
            t.ln_f,
            None if cfg.weight_tying else t.ff_out,
            cfg.n_heads,
            cfg.kv_heads,
            cfg.rope_theta,
        )
    if isinstance(model, DreamModel):
        m, cfg = model.model, model.config
        blocks = [
            (
                b.input_layernorm,
                b.self_attn.q_proj,
                b.self_attn.k_proj,
                b.self_attn.v_proj,
                b.self_attn.o_proj,
                b.post_attention_layernorm,
                b.mlp.gate_proj,
                b.mlp.up_proj,
                b.mlp.down_proj,
            )
            for b in m.layers
        ]
        head = None if cfg.tie_word_embeddings else model.lm_head
        return (
            m.embed_tokens,
            blocks,
            m.norm,
            head,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.rope_theta,
        )
    raise TypeError(
        f"the Fast-dLLM reference loop supports dyllm-fx's LLaDA and Dream models, not {type(model).__name__}"
    )


class FastDLLMReference(nn.Module):
    """A model wrapper ``dyllm_fx.generate`` runs with the reference block-cache loop."""

    def __init__(self, model: nn.Module, mode: str = "dual"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        self.parts = _layers(model)
        self.model = model
        self.mode = mode
        self.diffusion = model.diffusion

    def make_step_function(self) -> "ReferenceStep":
        return ReferenceStep(self)

    def forward(self, *args, **kwargs):
        raise TypeError(
            "FastDLLMReference runs denoising steps; call dyllm_fx.generate(wrapper, tokenizer, prompts)"
        )


class ReferenceStep:
    def __init__(self, ref: FastDLLMReference):
        self.ref = ref
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.hidden: torch.Tensor | None = None
        self.block_start: int | None = None

    def __call__(self, request: StepRequest) -> torch.Tensor:
        embed, blocks, norm, head, n_heads, n_kv, theta = self.ref.parts
        ids, pos = request.input_ids, request.position_ids
        shift = self.ref.diffusion.logits_shift
        refresh = request.block_start != self.block_start
        start = 0 if refresh else request.block_start
        end = request.block_end if (self.ref.mode == "dual" and not refresh) else ids.shape[1]
        self.block_start = request.block_start
        x = embed(ids[:, start:end])
        head_dim = blocks[0][1].out_features // n_heads
        cos, sin = rope_cos_sin(pos[:, start:end], head_dim, theta, x.dtype)
        mask = key_padding_mask(request.attention_mask)
        if refresh:
            self.k, self.v = [], []
        for i, (norm1, q_proj, k_proj, v_proj, o_proj, norm2, gate, up, down) in enumerate(blocks):
            h = norm1(x)
            bsz, n = h.shape[:2]
            q = apply_rope(q_proj(h).view(bsz, n, n_heads, head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(k_proj(h).view(bsz, n, n_kv, head_dim).transpose(1, 2), cos, sin)
            v = v_proj(h).view(bsz, n, n_kv, head_dim).transpose(1, 2)
            if refresh:
                self.k.append(k)
                self.v.append(v)
            else:  # the rows' new K/V over the cached ones (Fast-dLLM's replace_position)
                self.k[i][:, :, start:end] = k
                self.v[i][:, :, start:end] = v
            ctx = F.scaled_dot_product_attention(
                q, self.k[i], self.v[i], attn_mask=mask, enable_gqa=n_heads != n_kv
            )
            x = x + o_proj(ctx.transpose(1, 2).reshape(bsz, n, -1))
            h = norm2(x)
            x = x + down(F.silu(gate(h)) * up(h))
        if refresh:
            self.hidden = x
        else:
            self.hidden[:, start:end] = x
        rows = self.hidden[:, request.block_start - shift : request.block_end - shift]
        rows = norm(rows)
        return rows @ embed.weight.t() if head is None else head(rows)


__all__ = ["FastDLLMReference", "MODES"]
