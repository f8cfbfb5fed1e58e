"""A transformer block of the tiny LLaDA / Dream models written out by hand (not a test
module): the tests build their references of the policies' steps from these pieces, from the
model's own weights, without the compiler's pieces."""

from __future__ import annotations

import torch.nn.functional as F

import dyllm_fx
from dyllm_fx.models.layers import apply_rope, rope_cos_sin


def arch_modules(model) -> dict:
    """The modules a hand-written block needs, per architecture."""
    if isinstance(model, dyllm_fx.models.LLaDAModelLM):
        cfg, t = model.config, model.model.transformer
        layers = [
            (b.attn_norm, b.q_proj, b.k_proj, b.v_proj, b.attn_out, b.ff_norm, b.ff_proj, b.up_proj, b.ff_out)
            for b in t.blocks
        ]
        return dict(
            embed=t.wte,
            layers=layers,
            norm=t.ln_f,
            head=t.ff_out,
            heads=cfg.n_heads,
            kv_heads=cfg.kv_heads,
            head_dim=cfg.d_model // cfg.n_heads,
            theta=cfg.rope_theta,
        )
    cfg = model.config
    layers = [
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
        for b in model.model.layers
    ]
    return dict(
        embed=model.model.embed_tokens,
        layers=layers,
        norm=model.model.norm,
        head=model.lm_head,
        heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        theta=cfg.rope_theta,
    )


def project(arch, layer, x, rows, pos):
    """q (B, H, A, d), k, v (B, KV, A, d) of rows ``rows`` whose inputs are ``x`` (B, A, D)."""
    norm1, q_proj, k_proj, v_proj = arch["layers"][layer][:4]
    bsz, n, _ = x.shape
    hd = arch["head_dim"]
    cos, sin = rope_cos_sin(pos.gather(1, rows), hd, arch["theta"], x.dtype)
    h = norm1(x)
    q = apply_rope(q_proj(h).view(bsz, n, arch["heads"], hd).transpose(1, 2), cos, sin)
    k = apply_rope(k_proj(h).view(bsz, n, arch["kv_heads"], hd).transpose(1, 2), cos, sin)
    v = v_proj(h).view(bsz, n, arch["kv_heads"], hd).transpose(1, 2)
    return q, k, v


def o_proj(arch, layer, x, ctx):
    """The attention half's output: x + o_proj(context) for context (B, H, A, d)."""
    bsz, _, n, _ = ctx.shape
    return x + arch["layers"][layer][4](ctx.transpose(1, 2).reshape(bsz, n, -1))


def mlp(arch, layer, h_mid):
    norm2, gate, up, down = arch["layers"][layer][5:]
    h = norm2(h_mid)
    return down(F.silu(gate(h)) * up(h))


def repeat_kv(x, heads):
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def logits(arch, hidden):
    return arch["head"](arch["norm"](hidden))
