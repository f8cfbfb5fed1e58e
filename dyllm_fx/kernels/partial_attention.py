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

Without the Triton kernels (e.g. on CPU) ``partial_attention`` runs SDPA (the reference) and
``partial_attention_stats`` runs :func:`partial_attention_stats_fast`: one fp32 pass (scores, row
max, exp, row sum, (e @ V) / l) instead of SDPA plus the reference's second, dense score pass for
the statistics. Its output therefore equals ``partial_attention``'s up to float rounding, not bit
for bit (``STATS_OUT_FROM_SDPA`` = True takes SDPA's output instead, at about the reference's cost).
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
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, float("-inf")
        )
    return mask.float()


def bias_operand(bias: torch.Tensor | None, placeholder: torch.Tensor):
    """What a kernel takes for an optional :func:`attention_bias`: (tensor, its three strides with
    0 on the broadcast dimensions). Without a bias, ``placeholder`` stands in (never read)."""
    if bias is None:
        return placeholder, (0, 0, 0)
    return bias, (
        bias.stride(0) if bias.shape[0] > 1 else 0,
        bias.stride(1) if bias.shape[1] > 1 else 0,
        bias.stride(2),
    )


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


# Below every finite fp32: the row max of a fully masked row (-inf) clamped to it gives the same
# exp(s - m) = 0 as the references' "m = -inf -> 0" substitution, in one op.
_NEG_FINITE = torch.finfo(torch.float32).min


def mask_layout(mask: torch.Tensor | None, bsz: int, seq_len: int) -> str | None:
    """The layout of an SDPA mask: "key" for (B|1, 1, 1, L), "full" for (B|1, 1, L, L), None for
    no mask; raises NotImplementedError for any other layout (as :func:`attention_bias`)."""
    if mask is None:
        return None
    if (
        mask.dim() != 4
        or mask.shape[1] != 1
        or mask.shape[-1] != seq_len
        or mask.shape[0] not in (1, bsz)
        or mask.shape[2] not in (1, seq_len)
    ):
        raise NotImplementedError(f"mask of shape {tuple(mask.shape)}")
    return "key" if mask.shape[2] == 1 else "full"


def apply_mask_(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s += mask in place (boolean: -inf where False); ``mask`` broadcasts to ``s``. A boolean
    mask becomes a small 0 / -inf bias first: on CPU a broadcast add is much cheaper
    than a broadcast ``masked_fill_`` over the score tensor."""
    if mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, float("-inf"))
    return s.add_(mask)


# Where ``partial_attention_stats_fast`` takes its output from. False (the default): from its one
# pass, (e @ V) / l, for fp32 calls of at most ONE_PASS_MAX_SCORES scores: one pass over the scores
# instead of the reference's SDPA plus a score pass (faster at decoding shapes, see
# benchmarks/cpu_ops.py and benchmarks/results/cpu_ops_cpu.md), and equal to SDPA (so to
# ``partial_attention``) up to float rounding. True: from SDPA, as the reference, so
# that the two ops agree bit for bit; the lean statistics pass then saves next to nothing (SDPA
# plus a score pass, like the reference). ``partial_attention`` itself stays SDPA: a one-pass
# output is no faster there, and SDPA keeps the transformed model's dense steps equal to the
# original model's (tests/test_transform.py compares logits at atol 1e-5).
STATS_OUT_FROM_SDPA = False

# The one-pass attention materializes the fp32 scores (B, H, A, L). Up to this many it keeps up
# with SDPA on CPU; above, SDPA's blocked kernel is faster and needs no scores
# (benchmarks/cpu_ops.py).
ONE_PASS_MAX_SCORES = 1 << 20


def _lean_layout(q, k_cache, mask):
    """The mask layout ("key", "full", or None for no mask) when the lean paths take these
    inputs, else False (other mask layouts, malformed shapes: the references handle them)."""
    if (
        q.dim() != 4
        or k_cache.dim() != 4
        or q.shape[0] != k_cache.shape[0]
        or q.shape[1] % max(k_cache.shape[1], 1)
    ):
        return False
    try:
        return mask_layout(mask, q.shape[0], k_cache.shape[2])
    except NotImplementedError:  # per-head, 2-d, 3-d masks: SDPA broadcasts them its own way
        return False


def _one_pass_ok(q, k_cache, v_cache) -> bool:
    """Whether :func:`partial_attention_stats_fast` takes its output from its own pass: small
    fp32 calls, unless ``STATS_OUT_FROM_SDPA``."""
    return (
        not STATS_OUT_FROM_SDPA
        and q.dtype == k_cache.dtype == v_cache.dtype == torch.float32
        and q.shape[0] * q.shape[1] * q.shape[2] * k_cache.shape[2] <= ONE_PASS_MAX_SCORES
    )


def _lean_scores(q, k_cache, rows, mask, layout, scale):
    """(e, m, l): e = exp(s - m) (B*KV, G*A, L) of the fp32 scaled, masked scores s, and the row
    max m and row sum l (B*KV, G*A) as the reference's (-inf and 0 on fully masked rows). GQA by
    viewing q as (B*KV, G*A, d): K is never repeated (3-d ``bmm``, cheaper than 4-d matmul)."""
    bsz, heads, n_q, d = q.shape
    kv_heads, seq_len = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q3 = q.float().reshape(bsz * kv_heads, group * n_q, d)
    s = torch.bmm(q3, k_cache.float().reshape(bsz * kv_heads, seq_len, d).transpose(1, 2)).mul_(scale)
    if layout is not None:
        if layout == "full":
            mask = gather_rows(mask, rows, 2)  # (B, 1, A, L)
        # (B|1, 1, 1, 1|A, L) against the scores seen as (B, KV, G, A, L)
        apply_mask_(s.view(bsz, kv_heads, group, n_q, seq_len), mask.unsqueeze(1))
    m = s.amax(-1)
    e = s.sub_(m.clamp_min(_NEG_FINITE).unsqueeze(-1)).exp_()
    return e, m, e.sum(-1)


def _one_pass_out(e, l, q, v_cache):
    """(e @ V) / l as (B, H, A, dv) in q's dtype. l >= 1 whenever the row max is finite (its own
    term is exp(0) = 1); l = 0 only for fully masked rows, whose e @ V is 0: clamping l to 1 gives
    their zero output (as SDPA on CPU)."""
    bsz, heads, n_q = q.shape[:3]
    kv_heads, seq_len, dv = v_cache.shape[1:]
    out = torch.bmm(e, v_cache.float().reshape(bsz * kv_heads, seq_len, dv))
    return out.div_(l.clamp_min(1.0).unsqueeze(-1)).view(bsz, heads, n_q, dv).to(q.dtype)


def partial_attention_stats_fast(q, k_cache, v_cache, rows, mask, scale):
    """Lean CPU version of :func:`partial_attention_stats_reference`: the same (out, m, l) up to
    float rounding, in one fp32 pass of about a dozen torch ops, scores -> row max -> exp -> row
    sum -> (e @ V) / l, instead of SDPA plus a second, dense score pass. GQA by viewing q as
    (B*KV, G*A, d) (K/V never repeated). Fully masked rows give out 0, m -inf, l 0, as the
    reference. Large (> ``ONE_PASS_MAX_SCORES``) or 16-bit calls, and every call with
    ``STATS_OUT_FROM_SDPA``, take the output from SDPA and only the statistics from the pass.
    Masks other than the (B|1, 1, 1|L, L) layouts go to the reference."""
    layout = _lean_layout(q, k_cache, mask)
    if layout is False:
        return partial_attention_stats_reference(q, k_cache, v_cache, rows, mask, scale)
    bsz, heads, n_q = q.shape[:3]
    e, m, l = _lean_scores(q, k_cache, rows, mask, layout, scale)
    if _one_pass_ok(q, k_cache, v_cache):
        out = _one_pass_out(e, l, q, v_cache)
    else:
        out = partial_attention_reference(q, k_cache, v_cache, rows, mask, scale)
    return out, m.view(bsz, heads, n_q), l.view(bsz, heads, n_q)


if HAS_TRITON:
    from ._triton import load_tile, program_rows, running_max, scaled_scores

    @triton.jit
    def _partial_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        bias_ptr,
        o_ptr,
        m_ptr,
        l_ptr,
        sq_b,
        sq_h,
        sq_a,
        sq_d,
        sk_b,
        sk_h,
        sk_l,
        sk_d,
        sv_b,
        sv_h,
        sv_l,
        sv_d,
        sbias_b,
        sbias_q,
        sbias_l,
        H,
        A,
        L,
        D,
        DV,
        GROUP,
        scale_log2,
        HAS_BIAS: tl.constexpr,
        WRITE_STATS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        PREC: tl.constexpr,
    ):
        b, h, kvh, offs_m, row_ok = program_rows(H, GROUP, A, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        d_ok = offs_d < D
        dv_ok = offs_dv < DV

        q = load_tile(q_ptr + b * sq_b + h * sq_h, offs_m, offs_d, sq_a, sq_d, row_ok, d_ok)
        k_base = k_ptr + b * sk_b + kvh * sk_h
        v_base = v_ptr + b * sv_b + kvh * sv_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for start in range(0, L, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < L
            k = load_tile(k_base, cols, offs_d, sk_l, sk_d, col_ok, d_ok)
            bias_ptrs = bias_ptr + b * sbias_b + offs_m[:, None] * sbias_q + cols[None, :] * sbias_l
            bias_ok = row_ok[:, None] & col_ok[None, :]
            s = scaled_scores(q, k, bias_ptrs, bias_ok, col_ok, scale_log2, HAS_BIAS, PREC)
            m_new, m_safe = running_max(m_i, s)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = load_tile(v_base, cols, offs_dv, sv_l, sv_d, col_ok, dv_ok)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = tl.where((l_i > 0)[:, None], acc / l_safe[:, None], 0.0)
        o_rows = (b * H + h) * A + offs_m
        tl.store(
            o_ptr + o_rows[:, None] * DV + offs_dv[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None] & dv_ok[None, :],
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
    bias_t, sbias = bias_operand(bias, q)
    block_m = min(64, next_pow2(n_q))
    block_n = min(64, next_pow2(seq_len))
    grid = (triton.cdiv(n_q, block_m), bsz * heads)
    _partial_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        bias_t,
        out,
        m,
        l,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *sbias,
        heads,
        n_q,
        seq_len,
        d,
        dv,
        heads // kv_heads,
        scale * LOG2E,
        HAS_BIAS=bias is not None,
        WRITE_STATS=return_stats,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=next_pow2(d),
        BLOCK_DV=next_pow2(dv),
        PREC=dot_precision(q.dtype),
    )
    return (out, m, l) if return_stats else out
