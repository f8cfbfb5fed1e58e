"""Partial attention: the active rows' queries over every cached key (``dyllm::partial_attention``).

    out[b, h, a] = softmax(q[b, h, a] . K[b, h // G]^T * scale + bias[b, a]) . V[b, h // G]

q (B, H, A, d) holds the queries of the rows in ``rows`` (B, A); K/V caches (B, KV, L, d) hold
every position, G = H / KV (grouped-query attention). Bidirectional: no causal mask. ``mask``
is an SDPA mask: boolean (True = attend) or additive float, shaped (B|1, 1, 1, L) (key padding)
or (B|1, 1, L, L) (a full query x key mask whose query rows ``rows`` selects). Other shapes
(per-head masks, 2-d / 3-d masks, which SDPA broadcasts differently) fall back to the reference.

The Triton kernel is flash-attention style: one program per (block of query rows, batch x head),
an online softmax over key blocks (running row max m and row sum l, base 2 internally), fp32
accumulation, the output cast to q's dtype. Optionally it writes the per-row softmax statistics
in natural-log units,

    m[b, h, a] = max_j s_j          l[b, h, a] = sum_j exp(s_j - m)      (s = scaled, masked scores)

so that log-sum-exp = m + log(l); ``approx_attention`` can reuse them (its cached-stats mode).
Rows whose keys are all masked give a zero output (as torch's SDPA on CPU), m = -inf, l = 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, dot_precision, next_pow2, require_triton, tl, triton
from .cache_scatter import gather_rows

LOG2E = 1.4426950408889634


def partial_attention_reference(q, k_cache, v_cache, rows, mask, scale):
    """Plain torch (the CPU path of ``dyllm::partial_attention``)."""
    if mask is not None and mask.dim() == 4 and mask.shape[-2] != 1:
        mask = gather_rows(mask, rows, 2)
    out = F.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k_cache.shape[1]
    )
    # SDPA's output layout differs by backend; the op promises a contiguous tensor (as its
    # fake implementation says), so compiled graphs can rely on the strides.
    return out.contiguous()


def attention_bias(mask: torch.Tensor | None, rows: torch.Tensor | None, bsz: int, seq_len: int):
    """An SDPA mask as an fp32 additive bias (B|1, Q, L), Q = 1 or the query rows; None when no
    mask. Raises NotImplementedError for masks the kernels do not take (per-head masks).

    ``rows`` (B, A) selects the query rows of a full (.., L, L) mask (None: keep all L rows).
    """
    if mask is None:
        return None
    # Only 4-d masks: a 2-d mask means (Lq, L) to SDPA, so (B, L) key padding must come as
    # (B, 1, 1, L) (what ``models.layers.key_padding_mask`` builds).
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != seq_len or mask.shape[0] not in (1, bsz):
        raise NotImplementedError(f"mask of shape {tuple(mask.shape)}")
    if mask.shape[2] != 1:
        if mask.shape[2] != seq_len:
            raise NotImplementedError(f"mask of shape {tuple(mask.shape)}")
        if rows is not None:
            mask = gather_rows(mask, rows, 2)
    mask = mask[:, 0]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.float()


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def scores_reference(q, k, bias, scale):
    """fp32 scaled scores (B, H, Aq, L) with the additive bias, GQA-expanded."""
    s = q.float() @ _repeat_kv(k, q.shape[1]).float().transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias[:, None]
    return s


def softmax_stats(s: torch.Tensor):
    """Row max m and row sum l = sum exp(s - m) of scores s (..., L); m = -inf, l = 0 for rows
    that are masked everywhere."""
    m = s.amax(-1)
    m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    return m, torch.exp(s - m_safe[..., None]).sum(-1)


def partial_attention_stats_reference(q, k_cache, v_cache, rows, mask, scale):
    """(out, m, l): the reference output plus the fp32 softmax statistics of each query row."""
    out = partial_attention_reference(q, k_cache, v_cache, rows, mask, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scores_reference(q, k_cache, None, scale)
    if mask is not None:  # any SDPA mask, broadcast to (B, H, A, L)
        if mask.dim() == 4 and mask.shape[-2] != 1:
            mask = gather_rows(mask, rows, 2)
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    m, l = softmax_stats(s)
    return out, m, l


if HAS_TRITON:

    @triton.jit
    def _partial_attention_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, m_ptr, l_ptr,
        sq_b, sq_h, sq_a, sq_d,
        sk_b, sk_h, sk_l, sk_d,
        sv_b, sv_h, sv_l, sv_d,
        sbias_b, sbias_q, sbias_l,
        H, A, L, D, DV, GROUP, scale_log2,
        HAS_BIAS: tl.constexpr, WRITE_STATS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PREC: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        kvh = (h // GROUP).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < A

        q = tl.load(
            q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_a + offs_d[None, :] * sq_d,
            mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0,
        )
        k_base = k_ptr + b * sk_b + kvh * sk_h
        v_base = v_ptr + b * sv_b + kvh * sv_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for start in range(0, L, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < L
            k = tl.load(
                k_base + cols[:, None] * sk_l + offs_d[None, :] * sk_d,
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
            if HAS_BIAS:
                bias = tl.load(
                    bias_ptr + b * sbias_b + offs_m[:, None] * sbias_q + cols[None, :] * sbias_l,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                )
                s = s + bias * 1.4426950408889634
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + cols[:, None] * sv_l + offs_dv[None, :] * sv_d,
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = tl.where((l_i > 0)[:, None], acc / l_safe[:, None], 0.0)
        o_rows = (b * H + h) * A + offs_m
        tl.store(
            o_ptr + o_rows[:, None] * DV + offs_dv[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (offs_dv[None, :] < DV),
        )
        if WRITE_STATS:
            tl.store(m_ptr + o_rows, m_i * 0.6931471805599453, mask=row_ok)  # log2 -> natural units
            tl.store(l_ptr + o_rows, l_i, mask=row_ok)


def triton_partial_attention(q, k_cache, v_cache, rows, mask, scale, return_stats: bool = False):
    """Triton version of :func:`partial_attention_reference`; with ``return_stats`` also the
    (B, H, A) fp32 row max and row sum (as :func:`partial_attention_stats_reference`)."""
    require_triton(q)
    bsz, heads, n_q, d = q.shape
    kv_heads, seq_len, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    try:
        bias = attention_bias(mask, rows, bsz, seq_len)
    except NotImplementedError:
        if return_stats:
            return partial_attention_stats_reference(q, k_cache, v_cache, rows, mask, scale)
        return partial_attention_reference(q, k_cache, v_cache, rows, mask, scale)
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty(bsz, heads, n_q, dv, dtype=q.dtype, device=q.device)
    m = torch.empty(bsz, heads, n_q, dtype=torch.float32, device=q.device) if return_stats else out
    l = torch.empty_like(m) if return_stats else out
    if out.numel() == 0:
        return (out, m, l) if return_stats else out
    if bias is None:
        bias_t, sbias = q, (0, 0, 0)
    else:
        bias_t = bias
        sbias = (bias.stride(0) if bias.shape[0] > 1 else 0, bias.stride(1) if bias.shape[1] > 1 else 0, bias.stride(2))
    block_m = min(64, next_pow2(n_q))
    block_n = min(64, next_pow2(seq_len))
    grid = (triton.cdiv(n_q, block_m), bsz * heads)
    _partial_attention_kernel[grid](
        q, k_cache, v_cache, bias_t, out, m, l,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *sbias,
        heads, n_q, seq_len, d, dv, heads // kv_heads, scale * LOG2E,
        HAS_BIAS=bias is not None, WRITE_STATS=return_stats,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_pow2(d), BLOCK_DV=next_pow2(dv),
        PREC=dot_precision(q.dtype),
    )
    return (out, m, l) if return_stats else out
