"""Building blocks shared by the LLaDA and Dream modules.

Everything here is plain torch (nn.Linear, elementwise ops, SDPA) so that torch.fx, dynamo and
torch.onnx see a graph made of standard ops; the compiler passes find the blocks from that
structure.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .spec import DiffusionSpec

# The tensor-parallel plan of a block under Hugging Face's Llama / Qwen2 module names
# (passes/tensor_parallel.py): heads and the MLP split over the ranks.
HF_BLOCK_TP_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as the reference models do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (batch, 1, seq, head_dim) for the given positions.

    Computed per call from the positions (no buffer), so models built on the meta device
    and filled by ``load_state_dict(assign=True)`` need no re-initialisation.
    """
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) by the half-split convention used by Llama, OLMo/LLaDA and Qwen2.

    Tables narrower than the head (partial rotary, LLaDA2) rotate the head's first features
    and pass the rest through unchanged."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) 1/0 mask -> boolean (B, 1, 1, T) SDPA mask that hides padded keys only.

    Padded query rows still attend to the real keys, so no row is fully masked (no NaN);
    their outputs are never read.
    """
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


def bidirectional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Full (non-causal) attention; q (B, H, T, hd), k/v (B, KV, T, hd) with H % KV == 0.

    GQA is left to SDPA (``enable_gqa``) so K/V stay at KV heads in the graph, and the
    compiler's K/V cache stores KV heads only.
    """
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=False, enable_gqa=q.shape[1] != k.shape[1]
    )


def default_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Positions that skip left padding, so a padded row sees the same positions as alone."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def self_attention(
    x: torch.Tensor,
    q_proj: nn.Linear,
    k_proj: nn.Linear,
    v_proj: nn.Linear,
    o_proj: nn.Linear,
    n_heads: int,
    n_kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    q_norm: nn.Module | None = None,
    k_norm: nn.Module | None = None,
) -> torch.Tensor:
    """Projection -> (per-head norm of q and k) -> RoPE -> bidirectional attention -> output
    projection, on (B, T, D)."""
    bsz, seq, _ = x.shape
    head_dim = q_proj.out_features // n_heads
    q = q_proj(x).view(bsz, seq, n_heads, head_dim).transpose(1, 2)
    k = k_proj(x).view(bsz, seq, n_kv_heads, head_dim).transpose(1, 2)
    v = v_proj(x).view(bsz, seq, n_kv_heads, head_dim).transpose(1, 2)
    if q_norm is not None:  # OLMoE / LLaDA-MoE: an RMSNorm over each head, before RoPE
        q, k = q_norm(q), k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    ctx = bidirectional_attention(q, k, v, mask)
    return o_proj(ctx.transpose(1, 2).reshape(bsz, seq, n_heads * head_dim))


def swiglu_mlp(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    return down(F.silu(gate(x)) * up(x))


class LMParts(NamedTuple):
    """Where a :class:`BidirectionalLM` keeps what its forward reads (under its own state-dict
    keys): the token embedding, the blocks, the final norm, the output head (None: tied to the
    embedding), and the RoPE head size (the rotated features of a head) and base."""

    embedding: nn.Embedding
    blocks: nn.ModuleList
    norm: nn.Module
    head: nn.Linear | None
    head_dim: int
    rope_theta: float


class BidirectionalLM(nn.Module):
    """The forward LLaDA and Dream share: embed the tokens, build the RoPE tables and the key
    padding mask once, run every block without a causal mask, then the final norm and the output
    head. A subclass builds its modules under its checkpoint's names and says where they are in
    :meth:`parts`. ``forward`` returns unshifted logits (B, T, vocab).

    ``config`` names its special tokens ``mask_token_id``, ``eos_token_id`` and ``pad_token_id``
    (both families' config.json do); ``logits_shift`` and ``max_length`` come from the family."""

    def __init__(self, config, logits_shift: int, max_length: int):
        super().__init__()
        self.config = config
        self.diffusion = DiffusionSpec(
            mask_token_id=config.mask_token_id,
            eos_token_ids=(config.eos_token_id,),
            pad_token_id=config.pad_token_id,
            logits_shift=logits_shift,
            max_length=max_length,
        )

    def parts(self) -> LMParts:
        raise NotImplementedError

    def attention_mask(self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor):
        """The SDPA mask every block gets: the keys of padding hidden, nothing else (a subclass
        that attends otherwise, block-causally, builds its own from the positions)."""
        return key_padding_mask(attention_mask)

    @property
    def layers(self) -> nn.ModuleList:
        return self.parts().blocks

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        parts = self.parts()
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        x = parts.embedding(input_ids)
        cos, sin = rope_cos_sin(position_ids, parts.head_dim, parts.rope_theta, x.dtype)
        mask = self.attention_mask(attention_mask, position_ids)
        for block in parts.blocks:
            x = block(x, cos, sin, mask)
        x = parts.norm(x)
        if parts.head is None:
            return x @ parts.embedding.weight.t()
        return parts.head(x)
