"""A plain-torch forward of LLaDA2 written from the published ``modeling_llada2_moe.py`` (not from
dyllm-fx's module), over a raw state dict with the checkpoint's own key names: the fused
query/key/value projection viewed as (heads + 2 kv heads) x head_dim and split, per-head QK
RMSNorm, RoPE on the first ``partial_rotary_factor`` of each head, eager attention with an
additive block-causal mask and an fp32 softmax, and the MoE block's sorted per-expert dispatch
(sigmoid router in fp32, expert bias for the choice only, group-limited top-k, renormalised and
scaled weights, shared experts); plus the published ``generate`` loop, step for step, at
temperature 0. Not a test module."""

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


def _mlp(state, key, x):
    gate = _linear(state, key + ".gate_proj", x)
    return _linear(state, key + ".down_proj", F.silu(gate) * _linear(state, key + ".up_proj", x))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x, cos, sin):
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + _rotate_half(x_rot) * sin, x_pass], dim=-1)


def _gate(state, key, flat, cfg):
    """(chosen experts, their weights) of each row, as the published router computes them."""
    n_group, experts = cfg["n_group"], cfg["num_experts"]
    logits = F.linear(flat.float(), state[key + ".gate.weight"].float())
    scores = torch.sigmoid(logits)
    routing = scores + state[key + ".gate.expert_bias"]
    rows = routing.shape[0]
    group_scores = routing.view(rows, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=cfg["topk_group"], dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(rows, n_group, experts // n_group).reshape(rows, -1)
    masked = routing.masked_fill(~score_mask.bool(), float("-inf"))
    _, chosen = torch.topk(masked, k=cfg["num_experts_per_tok"], dim=-1)
    weights = torch.gather(scores, dim=1, index=chosen)
    if cfg["num_experts_per_tok"] > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return chosen, weights * cfg["routed_scaling_factor"]


def _moe(state, key, x, cfg):
    bsz, seq, dim = x.shape
    flat = x.reshape(-1, dim)
    chosen, weights = _gate(state, key, flat, cfg)
    order = chosen.view(-1).argsort()
    tokens = flat[order // chosen.shape[1]]
    counts = torch.bincount(chosen.view(-1), minlength=cfg["num_experts"]).tolist()
    outputs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outputs.append(_mlp(state, f"{key}.experts.{e}", tokens[start : start + n]))
        start += n
    routed = torch.empty_like(tokens)
    routed[order] = torch.cat(outputs)
    out = (routed.view(*chosen.shape, -1).float() * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
    out = out.view(bsz, seq, dim)
    if cfg.get("num_shared_experts"):
        out = out + _mlp(state, key + ".shared_experts", x)
    return out


@torch.no_grad()
def llada2_logits(state: dict, cfg: dict, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Logits (B, T, vocab) of the checkpoint ``state`` under config ``cfg``, with the published
    generate's block-diffusion mask (blocks of ``cfg["block_length"]`` positions). Positions count
    from the first real token of a left-padded row, as dyllm-fx passes them."""
    d, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // heads
    eps, block = cfg["rms_norm_eps"], cfg["block_length"]
    rot = int(hd * cfg["partial_rotary_factor"])
    bsz, seq = input_ids.shape
    x = F.embedding(input_ids, state["model.word_embeddings.weight"])
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None].to(x.dtype), emb.sin()[:, None].to(x.dtype)
    blocks = position_ids // block
    allowed = (blocks[:, :, None] >= blocks[:, None, :]) & attention_mask.bool()[:, None, :]
    additive = torch.where(allowed, 0.0, float("-inf"))[:, None].to(x.dtype)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = _rms(x, state[p + ".input_layernorm.weight"], eps)
        qkv = _linear(state, p + ".attention.query_key_value", h).view(bsz, seq, heads + 2 * kv, hd)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([heads, kv, kv], dim=-2))
        q = _rms(q, state[p + ".attention.query_layernorm.weight"], eps)
        k = _rms(k, state[p + ".attention.key_layernorm.weight"], eps)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k, v = k.repeat_interleave(heads // kv, dim=1), v.repeat_interleave(heads // kv, dim=1)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd) + additive
        ctx = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        x = x + _linear(state, p + ".attention.dense", ctx.transpose(1, 2).reshape(bsz, seq, heads * hd))
        h = _rms(x, state[p + ".post_attention_layernorm.weight"], eps)
        if i >= cfg.get("first_k_dense_replace", 0):
            x = x + _moe(state, p + ".mlp", h, cfg)
        else:
            x = x + _mlp(state, p + ".mlp", h)
    x = _rms(x, state["model.norm.weight"], eps)
    head = state.get("lm_head.weight", state["model.word_embeddings.weight"])
    return F.linear(x, head)


def _transfer_counts(block_length: int, steps: int) -> list[int]:
    base, remainder = divmod(block_length, steps)
    return [base + (1 if s < remainder else 0) for s in range(steps)]


@torch.no_grad()
def _sample(logits, temperature, top_k, top_p):
    """The published ``_sample_with_temperature_topk_topp`` for (1, Lb, V) logits: greedy at
    temperature 0; else logits / temperature, the top-k cut (scores below the k-th largest to
    -inf), the top-p cut (in descending order, a token goes when the cumulative probability of
    the tokens before it exceeds p; the first always stays), softmax, one multinomial draw per
    row from the global generator. Returns (tokens, their probabilities), (1, Lb) each."""
    if temperature == 0:
        x0 = logits.argmax(dim=-1)
        return x0, F.softmax(logits.float(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    if temperature != 1.0:
        flat = flat / temperature
    if top_k:
        kth = torch.topk(flat, top_k).values[..., -1, None]
        flat = torch.where(flat < kth, torch.full_like(flat, float("-inf")), flat)
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(flat, descending=True)
        over = torch.cumsum(F.softmax(ordered, dim=-1), dim=-1) > top_p
        over[..., 1:] = over[..., :-1].clone()
        over[..., 0] = False
        flat = flat.masked_fill(torch.zeros_like(over).scatter(-1, order, over), float("-inf"))
    probs = F.softmax(flat, dim=-1)
    token = torch.multinomial(probs, num_samples=1)
    return token.view(logits.shape[:-1]), probs.gather(-1, token).view(logits.shape[:-1])


def llada2_generate(
    logits_fn,
    prompt,
    gen_length,
    block_length,
    steps,
    threshold,
    mask_id,
    eos_id,
    minimal_topk=1,
    temperature=0.0,
    top_k=None,
    top_p=None,
) -> torch.Tensor:
    """The published ``generate`` for one prompt (1, P): blocks counted from position 0, the
    window up to the current block's end run at each step, a token drawn for every position of
    the block (``_sample``), every masked token above ``threshold`` committed if they are at
    least the step's scheduled count, else the scheduled count of the most confident; stops
    after a block holding an EOS. Returns the prompt and the response up to and including its
    first EOS. ``logits_fn(ids, positions)``."""
    steps = min(steps, gen_length // minimal_topk)
    plen = prompt.shape[1]
    num_blocks = (plen + gen_length + block_length - 1) // block_length
    total = num_blocks * block_length
    x = torch.full((1, total), mask_id, dtype=torch.long)
    x[:, :plen] = prompt
    positions = torch.arange(total)[None]
    schedule = _transfer_counts(block_length, steps)
    for num_block in range(plen // block_length, num_blocks):
        end = (num_block + 1) * block_length
        cur = x[:, :end]
        for step in range(steps):
            active = cur[:, -block_length:] == mask_id
            if active.sum() == 0:
                break
            logits = logits_fn(cur, positions[:, :end])[:, -block_length:]
            x0, x0_p = _sample(logits, temperature, top_k, top_p)
            confidence = torch.where(active, x0_p, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            high = confidence[0] > threshold
            if high.sum().item() >= schedule[step]:
                transfer[0] = high
            else:
                _, idx = torch.topk(confidence[0], k=min(schedule[step], active.sum().item()))
                transfer[0, idx] = True
            cur[:, -block_length:][transfer] = x0[transfer]
        if (x[0, plen:end] == eos_id).any():
            break
    answer = x[:, : plen + gen_length]
    eos = (answer[0, plen:] == eos_id).nonzero(as_tuple=True)[0]
    first = eos[0].item() if len(eos) else gen_length
    return answer[:, : plen + first + 1]
