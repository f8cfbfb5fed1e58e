"""A plain-torch forward of LLaDA-MoE written from the published ``modeling_lladamoe.py`` (not
from dyllm-fx's module), over a raw state dict with the checkpoint's own key names: per-head
QK RMSNorm on the flattened projections, eager attention with an additive key-padding mask and
an fp32 softmax, and the sparse MoE block's loop over experts with ``index_add_`` (softmax over
all experts in fp32, optional expert bias, top-k taken as they are). Not a test module."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rms(x, w, eps):
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(dtype)


def _linear(state, key, x):
    return F.linear(x, state[key + ".weight"], state.get(key + ".bias"))


def _swiglu(state, key, x):
    gate = _linear(state, key + ".gate_proj", x)
    return _linear(state, key + ".down_proj", F.silu(gate) * _linear(state, key + ".up_proj", x))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _moe(state, key, x, cfg):
    bsz, seq, dim = x.shape
    flat = x.reshape(-1, dim)
    weights = F.softmax(F.linear(flat, state[key + ".gate.weight"]), dim=1, dtype=torch.float)
    if key + ".expert_bias" in state:
        weights = weights + state[key + ".expert_bias"]
    weights, chosen = torch.topk(weights, cfg["num_experts_per_tok"], dim=-1)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(flat)
    expert_mask = F.one_hot(chosen, num_classes=cfg["num_experts"]).permute(2, 1, 0)
    for e in range(cfg["num_experts"]):
        slot, rows = torch.where(expert_mask[e])
        y = _swiglu(state, f"{key}.experts.{e}", flat[rows]) * weights[rows, slot, None]
        out.index_add_(0, rows, y.to(x.dtype))
    return out.reshape(bsz, seq, dim)


@torch.no_grad()
def llada_moe_logits(state: dict, cfg: dict, input_ids, attention_mask=None) -> torch.Tensor:
    """Logits (B, T, vocab) of the checkpoint ``state`` (its key names) under config ``cfg``;
    positions count from the first real token of a left-padded row, as dyllm-fx passes them."""
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd, eps = d // heads, cfg["rms_norm_eps"]
    bsz, seq = input_ids.shape
    x = F.embedding(input_ids, state["model.embed_tokens.weight"])
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    freqs = pos.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None].to(x.dtype), emb.sin()[:, None].to(x.dtype)
    additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    freq = cfg.get("moe_layer_freq") or [1] * cfg["num_hidden_layers"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = _rms(x, state[p + ".input_layernorm.weight"], eps)
        q = _linear(state, p + ".self_attn.q_proj", h)
        k = _linear(state, p + ".self_attn.k_proj", h)
        if p + ".self_attn.q_norm.weight" in state:
            q = _rms(q.reshape(-1, hd), state[p + ".self_attn.q_norm.weight"], eps).reshape(bsz, seq, -1)
            k = _rms(k.reshape(-1, hd), state[p + ".self_attn.k_norm.weight"], eps).reshape(bsz, seq, -1)
        v = _linear(state, p + ".self_attn.v_proj", h)
        q = q.view(bsz, seq, heads, hd).transpose(1, 2)
        k = k.view(bsz, seq, kv, hd).transpose(1, 2)
        v = v.view(bsz, seq, kv, hd).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv, dim=1), v.repeat_interleave(heads // kv, dim=1)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd) + additive
        ctx = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        x = x + _linear(state, p + ".self_attn.o_proj", ctx.transpose(1, 2).reshape(bsz, seq, d))
        h = _rms(x, state[p + ".post_attention_layernorm.weight"], eps)
        if freq[i]:
            out = _moe(state, p + ".mlp", h, cfg)
            if cfg.get("shared_expert_intermediate_size") is not None:
                out = out + _swiglu(state, p + ".shared_expert", h)
        else:
            out = _swiglu(state, p + ".mlp", h)
        x = x + out
    x = _rms(x, state["model.norm.weight"], eps)
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    return F.linear(x, head)
