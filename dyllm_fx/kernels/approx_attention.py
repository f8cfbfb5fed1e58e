"""Approximate attention with saliency, in one kernel (``dyllm::approx_attention``; DyLLM,
arXiv 2603.08026).

Between two denoising steps only a few rows ("changed" rows) get new K/V. DyLLM keeps every
row's attention context from the previous step and corrects it with the value change:

    new_ctx[i] = cached_ctx[i] + sum_{j in changed} P[i, j] * dV[j]         (non-salient rows)
    new_ctx[i] = exact_ctx[i]                                                (salient rows)

    P = softmax(q K^T * scale + bias)  over all N keys,  dV[j] = V_new[j] - V_cached[j]

Inputs: q (B, H, N, d) of all rows; k (B, KV, N, d) of all rows (the cache with this step's
recomputed rows written in); ``changed`` (B, A) int64 and ``dv_rows`` (B, KV, A, d) (dV on the
changed rows, zero elsewhere); ``cached_ctx`` (B, H, N, d); ``salient_rows`` (B, S) int64 and
``salient_ctx`` (B, H, S, d), the exact context of the salient rows; an optional SDPA mask as in
``partial_attention`` ((B|1, 1, 1, N) key padding or a full (B|1, 1, N, N) mask, boolean or
additive; other layouts raise NotImplementedError, in every implementation);
``scale`` (None: 1/sqrt(d)). ``q_rows`` (B, Nq) int64: the absolute positions of the query
rows that q, ``cached_ctx`` and the outputs cover (a response, a block, any row set; None: the
first Nq rows). Rows outside it are not queried at all; ``salient_rows`` stay absolute positions
and every query slot whose row is salient takes the exact context. Row lists may hold -1
(padding, skipped) and repeats (the repeated entries must carry identical values; a repeated
changed row is counted once).

Outputs: ``ctx`` (B, H, N, d) in cached_ctx's dtype; ``stats`` (B, N, 3) fp32 per row
[<new, cached>, |new|^2, |cached|^2] summed over this call's heads (so shards of a
tensor-parallel model add them up before taking the cosine, see ``saliency.cosine_from_stats``);
``m``, ``l`` (B, H, N) fp32, the row max and row sum of the softmax used (natural-log units).

What is exact and what is approximated (mode 1, the default):
  * exact: the softmax normalizer. Every row's max and sum run over all N keys with the new K
    (the O(N^2 d) score pass), so P[i, changed] are this step's exact probabilities.
  * exact: the context of the salient rows (taken from ``salient_ctx``), and the statistics.
  * approximated: the non-salient rows' context. The exact new context is
        P_new V_new = P_old V_old + (P_new - P_old) V_old + P_new[:, changed] dV,
    the kernel drops the middle term: how the attention weights on the *unchanged* values moved
    (because some keys and the normalizer changed, or q itself changed). The correction term
    costs O(N A d) (only the changed columns), instead of O(N^2 d) for P V.
  * so when only V changed (K and every q as before) and ``cached_ctx`` = P_old V_old, the
    result is exact. When q and K move too, the error stays below the stale cached context's
    (tests/test_kernels.py bounds it on a step where a few rows change).

Kernel: one program per (block of query rows, batch x head). Pass 1 runs the online max/sum over
all key blocks (no V loads); pass 2 gathers the changed keys (by index) and their dV rows in
blocks of BLOCK_A and accumulates P[:, changed] . dV in fp32; the epilogue loads the cached
context, substitutes the salient rows (a (B, N) row -> slot map built by the wrapper), stores
the output and the per-head statistics, which the wrapper sums over heads (deterministic, no
float atomics). Repeated changed rows are turned into -1 by the wrapper (``unique_rows``). The
reference computes the same thing densely in fp32 (full score matrix, gathered columns); the
op's default (non-Triton, e.g. CPU) implementation is :func:`approx_attention_fast`, the same fp32
computation in fewer, larger torch ops (the reference stays the oracle of the tests).

Mode 2 (cached softmax statistics: pass ``k_old_rows`` (B, KV, A, d), the changed rows' keys
*before* this step's write, and ``m_old``/``l_old`` (B, H, N), the stats of the previous step
from ``partial_attention_stats`` or an earlier call): the score pass runs over the changed keys
only, O(N A d) in total, updating the normalizer as

    m   = max(m_old, max_{j in changed} s_new[i, j])
    l   = max(0, l_old exp(m_old - m) - sum_{j in changed} exp(s_old[i, j] - m))
          + sum_{j in changed} exp(s_new[i, j] - m)

with s_old = q k_old^T (this step's q against the old keys). This is the exact normalizer when
q[i] did not change since m_old/l_old were computed (then s_old is what the old sum holds) and
an approximation otherwise (stale scores of the unchanged keys). The max(0, .) guards the
cancellation when the changed keys dominated the old sum. For rows whose q did not change,
mode 2 equals mode 1 up to rounding; the returned m/l of salient rows (whose q did change) are
this update, not their exact statistics: take those from the call that computed their exact
context (``partial_attention_stats``).
"""

from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, dot_precision, next_pow2, require_triton, tl, triton
from .cache_scatter import gather_rows
from .partial_attention import (
    _NEG_FINITE,
    LOG2E,
    _repeat_kv,
    apply_mask_,
    attention_bias,
    bias_operand,
    mask_layout,
    scores_reference,
    softmax_stats,
)


def unique_rows(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(B, A) row indices with repeats (after their first occurrence) and out-of-range entries
    replaced by -1, positions unchanged."""
    valid = (rows >= 0) & (rows < n_rows)
    key = torch.where(valid, rows, n_rows)
    sorted_rows, order = key.sort(dim=1, stable=True)
    dup_sorted = torch.zeros_like(valid)
    dup_sorted[:, 1:] = sorted_rows[:, 1:] == sorted_rows[:, :-1]
    dup = torch.empty_like(dup_sorted).scatter_(1, order, dup_sorted)
    return torch.where(valid & ~dup, rows, -1)


def salient_slots(salient_rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(B, N) int32: for each row, its slot in ``salient_rows`` (any one when repeated), or -1."""
    bsz, n_sal = salient_rows.shape
    slot = torch.full((bsz, n_rows + 1), -1, dtype=torch.int32, device=salient_rows.device)
    valid = (salient_rows >= 0) & (salient_rows < n_rows)
    target = torch.where(valid, salient_rows, n_rows)
    src = torch.arange(n_sal, dtype=torch.int32, device=salient_rows.device).expand(bsz, n_sal)
    return slot.scatter_(1, target, src)[:, :n_rows]


def default_q_rows(q: torch.Tensor, q_rows: torch.Tensor | None) -> torch.Tensor:
    """``q_rows``, or the first Nq rows for every batch element when it is None."""
    if q_rows is not None:
        return q_rows
    return torch.arange(q.shape[2], device=q.device).expand(q.shape[0], -1)


def _check(q, k, changed, dv_rows, cached_ctx, salient_rows, salient_ctx, k_old_rows, m_old, l_old, q_rows):
    bsz, heads, n_rows, d = q.shape
    if k.shape[0] != bsz or heads % k.shape[1]:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if q_rows is not None and tuple(q_rows.shape) != (bsz, n_rows):
        raise ValueError(f"q_rows {tuple(q_rows.shape)} is not (B, Nq) = {(bsz, n_rows)}")
    if q_rows is None and n_rows > k.shape[2]:
        raise ValueError(f"{n_rows} query rows but only {k.shape[2]} key rows; pass q_rows")
    if dv_rows.shape[:3] != (bsz, k.shape[1], changed.shape[1]):
        raise ValueError(f"dv_rows {tuple(dv_rows.shape)} does not match changed {tuple(changed.shape)}")
    if cached_ctx.shape[:3] != (bsz, heads, n_rows) or cached_ctx.shape[-1] != dv_rows.shape[-1]:
        raise ValueError(f"cached_ctx {tuple(cached_ctx.shape)} does not match q / dv_rows")
    if salient_ctx.shape != (bsz, heads, salient_rows.shape[1], cached_ctx.shape[-1]):
        raise ValueError(f"salient_ctx {tuple(salient_ctx.shape)} does not match salient_rows / cached_ctx")
    if k_old_rows is not None and k_old_rows.shape != (bsz, k.shape[1], changed.shape[1], d):
        raise ValueError(f"k_old_rows {tuple(k_old_rows.shape)} does not match changed / k")
    if (m_old is None) != (l_old is None) or (m_old is not None and k_old_rows is None):
        raise ValueError("the cached-stats mode needs k_old_rows, m_old and l_old together")
    for name, t in (("m_old", m_old), ("l_old", l_old)):
        if t is not None and t.shape != (bsz, heads, n_rows):
            raise ValueError(f"{name} {tuple(t.shape)} is not (B, H, N) = {(bsz, heads, n_rows)}")


def query_slots(salient_rows: torch.Tensor, q_rows: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(B, Nq) int64: for each query slot, the index of its row in ``salient_rows`` (any one
    when repeated), or -1 when its row is not salient."""
    return salient_slots(salient_rows, n_keys).gather(1, q_rows.clamp(0, n_keys - 1)).long()


def _finish(out, cached, slot, salient_ctx, dtype):
    """Query slots with a salient row (``slot`` >= 0, see :func:`query_slots`) take their exact
    context; (ctx, stats) with the fp32 statistics."""
    if salient_ctx.shape[2]:
        out = _salient_exact(out, slot, salient_ctx)
    stats = torch.stack(
        [(out * cached).sum((1, 3)), (out * out).sum((1, 3)), (cached * cached).sum((1, 3))], -1
    )
    return out.to(dtype), stats


def query_bias(mask, bsz: int, n_keys: int, q_rows: torch.Tensor):
    """The additive fp32 bias (B|1, 1 | Nq, n_keys) of the query rows ``q_rows`` (B, Nq)."""
    return attention_bias(mask, q_rows, bsz, n_keys)


def _implementation(body):
    """An implementation of the op from its ``body``: the op's signature and argument checks in
    front, ``q_rows`` and ``scale`` filled in (None: the first Nq rows, 1/sqrt(d)), and the mode 2
    inputs handed on as one ``cached_stats`` = (k_old_rows, m_old, l_old), None in mode 1."""

    def implementation(
        q,
        k,
        changed,
        dv_rows,
        cached_ctx,
        salient_rows,
        salient_ctx,
        mask,
        scale,
        k_old_rows=None,
        m_old=None,
        l_old=None,
        q_rows=None,
    ):
        _check(
            q, k, changed, dv_rows, cached_ctx, salient_rows, salient_ctx, k_old_rows, m_old, l_old, q_rows
        )
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        cached_stats = None if m_old is None else (k_old_rows, m_old, l_old)
        q_rows = default_q_rows(q, q_rows)
        return body(
            q, k, changed, dv_rows, cached_ctx, salient_rows, salient_ctx, mask, scale, q_rows, cached_stats
        )

    implementation.__name__ = implementation.__qualname__ = body.__name__
    implementation.__doc__ = body.__doc__
    return implementation


def _salient_exact(out, slot, salient_ctx):
    """``out`` (B, H, Nq, dv) fp32 with the query slots whose row is salient (``slot`` >= 0, see
    :func:`query_slots`) replaced by their exact context from ``salient_ctx``."""
    bsz, heads, n_rows, dv = out.shape
    exact = salient_ctx.float().gather(2, slot.clamp_min(0)[:, None, :, None].expand(bsz, heads, n_rows, dv))
    return torch.where((slot >= 0)[:, None, :, None], exact, out)


@_implementation
def approx_attention_reference(
    q, k, changed, dv_rows, cached_ctx, salient_rows, salient_ctx, mask, scale, q_rows, cached_stats
):
    """Plain torch, fp32 (see the module doc); mode 2 when ``m_old`` is given."""
    bsz, heads, n_rows, d = q.shape
    n_keys = k.shape[2]
    bias = query_bias(mask, bsz, n_keys, q_rows)
    ch = unique_rows(changed, n_keys)
    valid = (ch >= 0)[:, None, None, :]
    cols = ch.clamp_min(0)
    n_ch = cols.shape[1]
    k_ch = k.gather(2, cols[:, None, :, None].expand(bsz, k.shape[1], n_ch, d))
    bias_ch = None
    if bias is not None:
        bias = bias.expand(bsz, *bias.shape[1:])
        bias_ch = bias.gather(2, cols[:, None, :].expand(bsz, bias.shape[1], n_ch))
    s_new = scores_reference(q, k_ch, bias_ch, scale).masked_fill(~valid, float("-inf"))  # (B, H, N, A)
    if cached_stats is None:
        m, l = softmax_stats(scores_reference(q, k, bias, scale))
    else:
        k_old_rows, m_old, l_old = cached_stats
        s_old = scores_reference(q, k_old_rows, bias_ch, scale).masked_fill(~valid, float("-inf"))
        m = torch.maximum(m_old.float(), s_new.amax(-1))
        m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
        rest = l_old.float() * torch.exp(m_old.float() - m_safe) - torch.exp(s_old - m_safe[..., None]).sum(
            -1
        )
        l = rest.clamp_min(0) + torch.exp(s_new - m_safe[..., None]).sum(-1)
    m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    l_safe = torch.where(l > 0, l, torch.ones_like(l))
    p_ch = torch.exp(s_new - m_safe[..., None]) / l_safe[..., None]
    cached = cached_ctx.float()
    out = cached + p_ch @ _repeat_kv(dv_rows, heads).float()
    ctx, stats = _finish(
        out, cached, query_slots(salient_rows, q_rows, n_keys), salient_ctx, cached_ctx.dtype
    )
    return ctx, stats, m, l


def _dropped_columns(changed: torch.Tensor, n_keys: int):
    """(cols, drop): the changed rows clamped into [0, N) and (B, A) True for the entries
    :func:`unique_rows` turns into -1 (out of range, or a repeat of an earlier entry). The
    repeat test compares every pair (a (B, A, A) equality strictly below the diagonal), so any
    order works."""
    cols = changed.clamp(0, n_keys - 1)
    rep = (changed[:, :, None] == changed[:, None, :]).tril_(-1).any(-1)
    return cols, (cols != changed) | rep


def _rows_of(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x[b, h, cols[b, a]] for x (B, KV, N, d) and cols (B, A) in range: (B, KV, A, d)."""
    bsz, heads, n, d = x.shape
    if not x.is_contiguous():
        return x.gather(2, cols[:, None, :, None].expand(bsz, heads, cols.shape[1], d))
    # one index_select on the flattened rows: a fraction of the cost of an expanded gather
    flat = torch.arange(0, bsz * heads * n, n, device=x.device).view(bsz, heads, 1) + cols[:, None, :]
    return x.view(-1, d).index_select(0, flat.view(-1)).view(bsz, heads, cols.shape[1], d)


@_implementation
def approx_attention_fast(
    q, k, changed, dv_rows, cached_ctx, salient_rows, salient_ctx, mask, scale, q_rows, cached_stats
):
    """Lean torch version of :func:`approx_attention_reference` (the op's CPU path): the same
    (ctx, stats, m, l) up to float rounding, with fewer torch ops and fewer passes over the score
    and context tensors (its speed: benchmarks/cpu_ops.py).

    fp32 throughout. GQA by viewing q as (B*KV, G*Nq, d) (K/V never repeated). Mode 2 scores q
    against cat([K[changed], k_old_rows]) in one ``bmm`` and exponentiates both halves at once;
    repeated / out-of-range changed entries and the mask's changed columns become one
    (B, 1|Nq, A) 0 / -inf bias on those columns. Mode 1 runs the full score pass and gathers
    the changed columns of exp(s - m). Query slots whose row is salient take the exact context
    with one gather and one ``where``.
    """
    bsz, heads, n_rows, d = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bkv, gq = bsz * kv_heads, group * n_rows  # the (B*KV, G*Nq, .) batched-matmul view
    dv = cached_ctx.shape[-1]
    n_ch = changed.shape[1]
    layout = mask_layout(mask, bsz, n_keys)  # NotImplementedError for other layouts, as the reference
    if layout == "full":
        mask = gather_rows(mask, q_rows, 2)  # (B, 1, Nq, N)
    cols, drop = _dropped_columns(changed, n_keys)
    q3 = q.float().reshape(bkv, gq, d)

    if cached_stats is None:  # mode 1: the exact normalizer over all N keys
        s = torch.bmm(q3, k.float().reshape(bkv, n_keys, d).transpose(1, 2)).mul_(scale)  # (B*KV, G*Nq, N)
        if layout is not None:
            apply_mask_(s.view(bsz, kv_heads, group, n_rows, n_keys), mask.unsqueeze(1))
        m = s.amax(-1)
        e = s.sub_(m.clamp_min(_NEG_FINITE).unsqueeze(-1)).exp_()
        l = e.sum(-1)
        p = e.view(bsz, kv_heads * gq, n_keys).gather(2, cols[:, None, :].expand(bsz, kv_heads * gq, n_ch))
        # l >= 1 unless the row is fully masked (then l = 0 and p = 0), so clamping to 1 is the
        # reference's "l if l > 0 else 1"
        p.masked_fill_(drop[:, None, :], 0.0).div_(l.view(bsz, kv_heads * gq, 1).clamp_min(1.0))
        m, l = m.view(bsz, heads, n_rows), l.view(bsz, heads, n_rows)
    else:  # mode 2: the cached normalizer, updated over the changed keys only
        k_old_rows, m_old, l_old = cached_stats
        kk = torch.cat([_rows_of(k, cols), k_old_rows], 2).float()  # (B, KV, 2A, d): new keys, old keys
        s = torch.bmm(q3, kk.view(bkv, 2 * n_ch, d).transpose(1, 2)).mul_(scale)  # (B*KV, G*Nq, 2A)
        # one (B, 1|Nq, A) column bias for both halves: the mask on the changed columns, and -inf
        # on the dropped entries
        if layout is None:
            bias = torch.where(drop, float("-inf"), 0.0)[:, None]
        else:
            mk = mask.select(1, 0).expand(bsz, -1, -1)
            mk = mk.gather(2, cols[:, None, :].expand(bsz, mk.shape[1], n_ch))
            if mk.dtype == torch.bool:
                bias = torch.where(mk > drop[:, None], 0.0, float("-inf"))  # bool a > b: a and not b
            else:
                bias = mk.float().masked_fill_(drop[:, None], float("-inf"))
        s.view(bsz, kv_heads, group, n_rows, 2, n_ch).add_(bias.view(bsz, 1, 1, bias.shape[1], 1, n_ch))
        m_old, l_old = m_old.float(), l_old.float()
        s4 = s.view(bsz, heads, n_rows, 2 * n_ch)
        m = torch.maximum(m_old, s4[..., :n_ch].amax(-1)) if n_ch else m_old.clone()
        m_safe = m.clamp_min(_NEG_FINITE)  # -inf -> a finite floor: exp(-inf - floor) = 0, as exp(-inf - 0)
        e = s4.sub_(m_safe.unsqueeze(-1)).exp_()
        sums = e.view(bsz, heads, n_rows, 2, n_ch).sum(-1)  # [new keys, old keys]
        rest = (m_old - m_safe).exp_().mul_(l_old).sub_(sums[..., 1])
        l = rest.clamp_min_(0.0).add_(sums[..., 0])
        p = e[..., :n_ch] / torch.where(l > 0, l, 1.0).unsqueeze(-1)

    # out = cached + P[:, changed] . dV
    cached = cached_ctx.float()
    out = torch.baddbmm(
        cached.reshape(bkv, gq, dv), p.reshape(bkv, gq, n_ch), dv_rows.float().reshape(bkv, n_ch, dv)
    )
    out = out.view(bsz, heads, n_rows, dv)
    if salient_rows.shape[1] and n_rows:
        out = _salient_exact(out, query_slots(salient_rows, q_rows, n_keys), salient_ctx)
    dots = torch.stack(
        [
            torch.linalg.vecdot(out, cached),
            torch.linalg.vecdot(out, out),
            torch.linalg.vecdot(cached, cached),
        ],
        -1,
    )
    return out.to(cached_ctx.dtype), dots.sum(1), m, l


if HAS_TRITON:
    from ._triton import load_tile, program_rows, running_max, scaled_scores

    @triton.jit
    def _load_changed_keys(ch_ptr, k_base, b, A, a0, offs_a, offs_d, d_ok, sk_n, sk_d):
        """One tile of changed rows: (slots, row index, valid, their current keys)."""
        slots = a0 + offs_a
        idx = tl.load(ch_ptr + b * A + slots, mask=slots < A, other=-1)
        ok = idx >= 0
        idx = tl.where(ok, idx, 0)
        return slots, idx, ok, load_tile(k_base, idx, offs_d, sk_n, sk_d, ok, d_ok)

    @triton.jit
    def _approx_attention_kernel(
        q_ptr,
        k_ptr,
        ch_ptr,
        dv_ptr,
        c_ptr,
        slot_ptr,
        sal_ptr,
        bias_ptr,
        kold_ptr,
        mold_ptr,
        lold_ptr,
        o_ptr,
        part_ptr,
        m_ptr,
        l_ptr,
        sq_b,
        sq_h,
        sq_n,
        sq_d,
        sk_b,
        sk_h,
        sk_n,
        sk_d,
        sdv_b,
        sdv_h,
        sdv_a,
        sdv_d,
        sc_b,
        sc_h,
        sc_n,
        sc_d,
        ss_b,
        ss_h,
        ss_s,
        ss_d,
        sko_b,
        sko_h,
        sko_a,
        sko_d,
        sbias_b,
        sbias_q,
        sbias_l,
        H,
        N,
        NQ,
        A,
        D,
        DV,
        GROUP,
        scale_log2,
        HAS_BIAS: tl.constexpr,
        USE_STATS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        PREC: tl.constexpr,
    ):
        b, h, kvh, offs_m, row_ok = program_rows(H, GROUP, NQ, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_a = tl.arange(0, BLOCK_A)
        d_ok = offs_d < D
        dv_ok = offs_dv < DV
        q = load_tile(q_ptr + b * sq_b + h * sq_h, offs_m, offs_d, sq_n, sq_d, row_ok, d_ok)
        k_base = k_ptr + b * sk_b + kvh * sk_h
        bias_base = bias_ptr + b * sbias_b + offs_m[:, None] * sbias_q
        stat_rows = (b * H + h) * NQ + offs_m

        # Score pass: the softmax row max m_i and row sum l_i (base 2).
        if USE_STATS:
            m_old = tl.load(mold_ptr + stat_rows, mask=row_ok, other=0.0) * 1.4426950408889634
            l_old = tl.load(lold_ptr + stat_rows, mask=row_ok, other=0.0)
            m_i = m_old
            rest = l_old  # the unchanged keys' share of the sum, relative to m_i
            new_sum = tl.zeros([BLOCK_M], tl.float32)
            kold_base = kold_ptr + b * sko_b + kvh * sko_h
            for a0 in range(0, A, BLOCK_A):
                slots, idx, ok, kn = _load_changed_keys(
                    ch_ptr, k_base, b, A, a0, offs_a, offs_d, d_ok, sk_n, sk_d
                )
                ko = load_tile(kold_base, slots, offs_d, sko_a, sko_d, ok, d_ok)
                s_new = tl.dot(q, tl.trans(kn), input_precision=PREC) * scale_log2
                s_old = tl.dot(q, tl.trans(ko), input_precision=PREC) * scale_log2
                if HAS_BIAS:
                    bias = tl.load(
                        bias_base + idx[None, :] * sbias_l, mask=row_ok[:, None] & ok[None, :], other=0.0
                    )
                    s_new = s_new + bias * 1.4426950408889634
                    s_old = s_old + bias * 1.4426950408889634
                s_new = tl.where(ok[None, :], s_new, float("-inf"))
                s_old = tl.where(ok[None, :], s_old, float("-inf"))
                m_new, m_safe = running_max(m_i, s_new)
                alpha = tl.exp2(m_i - m_safe)
                rest = rest * alpha - tl.sum(tl.exp2(s_old - m_safe[:, None]), 1)
                new_sum = new_sum * alpha + tl.sum(tl.exp2(s_new - m_safe[:, None]), 1)
                m_i = m_new
            l_i = tl.maximum(rest, 0.0) + new_sum
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            offs_n = tl.arange(0, BLOCK_N)
            for start in range(0, N, BLOCK_N):
                cols = start + offs_n
                col_ok = cols < N
                kb = load_tile(k_base, cols, offs_d, sk_n, sk_d, col_ok, d_ok)
                bias_ptrs, bias_ok = bias_base + cols[None, :] * sbias_l, row_ok[:, None] & col_ok[None, :]
                s = scaled_scores(q, kb, bias_ptrs, bias_ok, col_ok, scale_log2, HAS_BIAS, PREC)
                m_new, m_safe = running_max(m_i, s)
                l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
                m_i = m_new
        m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)

        # Correction pass over the changed columns only: acc = P[:, changed] . dV.
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        dv_base = dv_ptr + b * sdv_b + kvh * sdv_h
        for a0 in range(0, A, BLOCK_A):
            slots, idx, ok, kn = _load_changed_keys(
                ch_ptr, k_base, b, A, a0, offs_a, offs_d, d_ok, sk_n, sk_d
            )
            bias_ptrs, bias_ok = bias_base + idx[None, :] * sbias_l, row_ok[:, None] & ok[None, :]
            s = scaled_scores(q, kn, bias_ptrs, bias_ok, ok, scale_log2, HAS_BIAS, PREC)
            p = tl.exp2(s - m_fin[:, None]) * inv_l[:, None]
            dv = load_tile(dv_base, slots, offs_dv, sdv_a, sdv_d, ok, dv_ok)
            acc += tl.dot(p, dv.to(tl.float32), input_precision=PREC)

        # Salient rows take their exact context; then the output and its statistics.
        out_mask = row_ok[:, None] & dv_ok[None, :]
        cached = load_tile(c_ptr + b * sc_b + h * sc_h, offs_m, offs_dv, sc_n, sc_d, row_ok, dv_ok)
        cached = cached.to(tl.float32)
        slot = tl.load(slot_ptr + b * NQ + offs_m, mask=row_ok, other=-1)
        is_sal = slot >= 0
        slot = tl.where(is_sal, slot, 0).to(tl.int64)
        exact = load_tile(sal_ptr + b * ss_b + h * ss_h, slot, offs_dv, ss_s, ss_d, row_ok & is_sal, dv_ok)
        exact = exact.to(tl.float32)
        out = tl.where(is_sal[:, None], exact, cached + acc)
        tl.store(
            o_ptr + stat_rows[:, None] * DV + offs_dv[None, :], out.to(o_ptr.dtype.element_ty), mask=out_mask
        )
        tl.store(part_ptr + stat_rows * 3, tl.sum(out * cached, 1), mask=row_ok)
        tl.store(part_ptr + stat_rows * 3 + 1, tl.sum(out * out, 1), mask=row_ok)
        tl.store(part_ptr + stat_rows * 3 + 2, tl.sum(cached * cached, 1), mask=row_ok)
        tl.store(m_ptr + stat_rows, m_i * 0.6931471805599453, mask=row_ok)
        tl.store(l_ptr + stat_rows, l_i, mask=row_ok)


@_implementation
def triton_approx_attention(
    q, k, changed, dv_rows, cached_ctx, salient_rows, salient_ctx, mask, scale, q_rows, cached_stats
):
    """Triton version of :func:`approx_attention_reference`: (ctx, stats, m, l)."""
    require_triton(q)
    use_stats = cached_stats is not None
    bsz, heads, n_rows, d = q.shape
    n_keys = k.shape[2]
    dv = cached_ctx.shape[-1]
    # full masks: the query rows' bias rows; other layouts raise NotImplementedError, as they do
    # in the reference
    bias = attention_bias(mask, q_rows, bsz, n_keys)
    scale = float(scale)
    ch = unique_rows(changed, n_keys).contiguous()
    slot = query_slots(salient_rows, q_rows, n_keys).to(torch.int32).contiguous()
    n_ch = ch.shape[1]
    ctx = torch.empty(bsz, heads, n_rows, dv, dtype=cached_ctx.dtype, device=q.device)
    part = torch.empty(bsz, heads, n_rows, 3, dtype=torch.float32, device=q.device)
    m = torch.empty(bsz, heads, n_rows, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    if ctx.numel() == 0:
        return ctx, part.sum(1), m, l
    bias_t, sbias = bias_operand(bias, q)
    if use_stats:
        k_old_rows, m_old, l_old = cached_stats
        kold, mold, lold = k_old_rows, m_old.float().contiguous(), l_old.float().contiguous()
    else:
        kold, mold, lold = k, m, l  # unused
    block_m = min(64, next_pow2(n_rows))
    grid = (triton.cdiv(n_rows, block_m), bsz * heads)
    _approx_attention_kernel[grid](
        q,
        k,
        ch,
        dv_rows,
        cached_ctx,
        slot,
        salient_ctx,
        bias_t,
        kold,
        mold,
        lold,
        ctx,
        part,
        m,
        l,
        *q.stride(),
        *k.stride(),
        *dv_rows.stride(),
        *cached_ctx.stride(),
        *salient_ctx.stride(),
        *kold.stride(),
        *sbias,
        heads,
        n_keys,
        n_rows,
        n_ch,
        d,
        dv,
        heads // k.shape[1],
        scale * LOG2E,
        HAS_BIAS=bias is not None,
        USE_STATS=use_stats,
        BLOCK_M=block_m,
        BLOCK_N=min(64, next_pow2(n_keys)),
        BLOCK_A=min(64, next_pow2(n_ch)),
        BLOCK_D=next_pow2(d),
        BLOCK_DV=next_pow2(dv),
        PREC=dot_precision(q.dtype),
    )
    # Per-head partial statistics summed here (deterministic; no float atomics).
    return ctx, part.sum(1), m, l
