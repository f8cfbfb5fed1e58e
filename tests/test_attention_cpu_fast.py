"""The lean CPU paths (``partial_attention_stats_fast``, ``approx_attention_fast``) against the
references they replace as the ops' default implementation.

fp32, tight tolerances: the fast paths compute the same fp32 quantities in fewer, larger torch
ops, so they may differ from the references by float rounding only. The grid covers GQA and MHA,
no mask / boolean and additive key padding / full boolean and additive masks (batch-1 too),
both modes of approx_attention, query spans that start after row 0, changed lists with -1,
out-of-range and repeated entries in any order, empty and out-of-span salient sets, and fully
masked rows. Shapes are tiny (N <= 24).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from dyllm_fx.kernels import approx_attention as aa
from dyllm_fx.kernels import partial_attention as pa

ops = torch.ops.dyllm

TOL = dict(rtol=1e-5, atol=1e-6)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _seed(*params):
    """A seed per test case, the same in every run (``hash`` of a str is salted per process)."""
    return zlib.crc32(repr(params).encode())


def _mask(kind, bsz, n, g):
    """An SDPA mask over n keys. Key padding: the last batch element is left-padded by 3 keys
    and, with ``bsz >= 3``, element 1 is padded entirely (all of its rows fully masked). Full:
    random, and the left-padded element's padded query rows see no key at all."""
    if kind is None:
        return None
    if kind in ("key", "key_add", "key_b1"):
        keep = torch.ones(bsz, 1, 1, n, dtype=torch.bool)
        keep[-1, ..., :3] = False
        if bsz >= 3:
            keep[1] = False
        if kind == "key_b1":
            return keep[-1:]
        if kind == "key_add":  # additive: -inf on the padding plus a finite random bias
            return torch.randn(bsz, 1, 1, n, generator=g).masked_fill(~keep, float("-inf"))
        return keep
    full = torch.rand(bsz, 1, n, n, generator=g) > 0.35
    full[..., 3] = True
    full[-1, :, :, :3] = False  # left padding: no row attends to the padded keys ...
    full[-1, :, :3, :] = False  # ... and the padded query rows attend to nothing
    if kind == "full_b1":
        return full[-1:]
    if kind == "full_add":
        return torch.randn(bsz, 1, n, n, generator=g).masked_fill(~full, float("-inf"))
    return full


MASKS = [None, "key", "key_add", "key_b1", "full", "full_add", "full_b1"]


def _close(got, want):
    for x, y in zip(got, want):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.is_contiguous()
        torch.testing.assert_close(x, y, **TOL)


# --- partial_attention_stats ------------------------------------------------------------------


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (2, 1)])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("out_from_sdpa", [True, False], ids=["sdpa_out", "one_pass_out"])
def test_partial_attention_stats_fast_matches_reference(monkeypatch, heads, kv_heads, mask_kind, scale, out_from_sdpa):
    monkeypatch.setattr(pa, "STATS_OUT_FROM_SDPA", out_from_sdpa)
    g = _gen(_seed(heads, kv_heads, mask_kind, scale))
    bsz, n_q, n, d = 3, 5, 11, 8
    q = torch.randn(bsz, heads, n_q, d, generator=g)
    k, v = torch.randn(2, bsz, kv_heads, n, d, generator=g)
    rows = torch.stack([torch.randperm(n, generator=g)[:n_q] for _ in range(bsz)])
    rows[-1, 0] = 1  # a left-padded query row: fully masked under the full masks
    mask = _mask(mask_kind, bsz, n, g)
    got = pa.partial_attention_stats_fast(q, k, v, rows, mask, scale)
    want = pa.partial_attention_stats_reference(q, k, v, rows, mask, scale)
    _close(got, want)
    if out_from_sdpa:  # the same output as partial_attention (SDPA), bit for bit
        assert torch.equal(got[0], ops.partial_attention(q, k, v, rows, mask, scale))
    if mask_kind in ("key", "key_add", "full", "full_add"):  # fully masked rows: out 0, m -inf, l 0
        dead = torch.isinf(want[1])
        assert dead.any()
        assert torch.equal(dead, torch.isinf(got[1])) and (got[2][dead] == 0).all()
        assert (got[0][dead] == 0).all()
    # the op's default (CPU) implementation is the fast path
    for x, y in zip(ops.partial_attention_stats(q, k, v, rows, mask, scale), got):
        assert torch.equal(x, y)


def test_partial_attention_stats_large_calls_take_sdpa_output(monkeypatch):
    """Above ONE_PASS_MAX_SCORES (here: any call) the output is SDPA's even without
    STATS_OUT_FROM_SDPA; the statistics still come from the lean pass."""
    monkeypatch.setattr(pa, "STATS_OUT_FROM_SDPA", False)
    monkeypatch.setattr(pa, "ONE_PASS_MAX_SCORES", 0)
    g = _gen(7)
    bsz, heads, kv_heads, n_q, n, d = 3, 4, 2, 5, 11, 8
    q = torch.randn(bsz, heads, n_q, d, generator=g)
    k, v = torch.randn(2, bsz, kv_heads, n, d, generator=g)
    rows = torch.stack([torch.randperm(n, generator=g)[:n_q] for _ in range(bsz)])
    mask = _mask("full", bsz, n, g)
    got = pa.partial_attention_stats_fast(q, k, v, rows, mask, None)
    assert torch.equal(got[0], pa.partial_attention_reference(q, k, v, rows, mask, None))
    _close(got, pa.partial_attention_stats_reference(q, k, v, rows, mask, None))


@pytest.mark.parametrize("out_from_sdpa", [True, False], ids=["sdpa_out", "one_pass_out"])
def test_partial_attention_stats_fast_other_inputs(monkeypatch, out_from_sdpa):
    """Non-contiguous q, other mask layouts (these go to the reference), 16-bit inputs (their
    output is SDPA's in both settings)."""
    monkeypatch.setattr(pa, "STATS_OUT_FROM_SDPA", out_from_sdpa)
    g = _gen(5)
    bsz, heads, kv_heads, n_q, n, d = 2, 4, 2, 3, 9, 8
    q = torch.randn(bsz, n_q, heads, d, generator=g).transpose(1, 2)
    k, v = torch.randn(2, bsz, kv_heads, n, d, generator=g)
    rows = torch.stack([torch.randperm(n, generator=g)[:n_q] for _ in range(bsz)])
    _close(pa.partial_attention_stats_fast(q, k, v, rows, None, None),
           pa.partial_attention_stats_reference(q, k, v, rows, None, None))
    per_head = torch.rand(bsz, heads, 1, n, generator=g) > 0.3
    per_head[..., 0] = True
    _close(pa.partial_attention_stats_fast(q, k, v, rows, per_head, None),
           pa.partial_attention_stats_reference(q, k, v, rows, per_head, None))
    half = [x.half() for x in (q, k, v)]
    got = pa.partial_attention_stats_fast(*half, rows, _mask("key", bsz, n, g), None)
    want = pa.partial_attention_stats_reference(*half, rows, _mask("key", bsz, n, g), None)
    assert got[0].dtype == torch.float16 and got[1].dtype == got[2].dtype == torch.float32
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1:], want[1:], **TOL)  # the stats are fp32 from fp16 inputs in both


# --- approx_attention -------------------------------------------------------------------------


def _approx_inputs(g, bsz, heads, kv_heads, n, q_start, n_q, d, salient):
    """Inputs of one call; ``changed`` holds -1 padding, an out-of-range row and repeats (with
    the first occurrence's dV / old key), in no particular order."""
    q = torch.randn(bsz, heads, n_q, d, generator=g)
    k = torch.randn(bsz, kv_heads, n, d, generator=g)
    changed = torch.stack([torch.randperm(n, generator=g)[:5] for _ in range(bsz)])
    dv_rows = torch.randn(bsz, kv_heads, 5, d, generator=g)
    k_old = k.gather(2, changed[:, None, :, None].expand(-1, kv_heads, -1, d))
    k_old = k_old + 0.2 * torch.randn(k_old.shape, generator=g)
    # slots 5..8: a repeat of slot 3, -1, a repeat of slot 0, an out-of-range row; then shuffle
    changed = torch.cat(
        [changed, changed[:, [3]], torch.full((bsz, 1), -1), changed[:, [0]], torch.full((bsz, 1), n + 2)], 1
    )

    def slots(x):  # the repeats copy their first occurrence, the dropped slots hold anything
        noise = torch.randn(bsz, kv_heads, 1, d, generator=g)
        return torch.cat([x, x[:, :, [3]], noise, x[:, :, [0]], 2 * noise], 2)

    dv_rows, k_old = slots(dv_rows), slots(k_old)
    perm = torch.randperm(changed.shape[1], generator=g)
    changed, dv_rows, k_old = changed[:, perm], dv_rows[:, :, perm], k_old[:, :, perm]
    cached = torch.randn(bsz, heads, n_q, d, generator=g)
    if salient == "none":
        sal = changed[:, :0]
    elif salient == "changed":  # with the repeats, -1 and the out-of-range entry, and rows outside the span
        sal = changed
    else:  # distinct rows, some outside [q_start, q_start + Nq), plus -1
        sal = torch.stack([torch.randperm(n, generator=g)[:4] for _ in range(bsz)])
        sal = torch.cat([sal, torch.full((bsz, 1), -1)], 1)
    sal_ctx = torch.randn(bsz, heads, sal.shape[1], d, generator=g)
    # repeated salient entries carry identical contexts (the op's contract)
    for b in range(bsz):
        for i in range(sal.shape[1]):
            first = (sal[b] == sal[b, i]).nonzero()[0, 0]
            sal_ctx[b, :, i] = sal_ctx[b, :, first]
    return q, k, changed, dv_rows, cached, sal, sal_ctx, k_old


def _span(start, n_q, bsz):
    """The query rows [start, start + n_q) of every batch element."""
    return torch.arange(start, start + n_q).expand(bsz, -1)


def _old_stats(q, k, mask, q_rows, g):
    """m_old / l_old as an earlier step leaves them: exact stats of slightly different scores
    (-inf / 0 on fully masked rows), with l_old shrunk on some rows so that the update's
    max(0, .) clamp is exercised."""
    bsz, _, n_q, d = q.shape
    bias = aa.query_bias(mask, bsz, k.shape[2], q_rows)
    s = pa.scores_reference(q, k, bias, 1 / math.sqrt(d))
    m, l = pa.softmax_stats(s + 0.1 * torch.randn(s.shape, generator=g))
    return m, l * torch.where(torch.rand(l.shape, generator=g) < 0.2, 0.3, 1.0)


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4)])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("cached_stats", [False, True], ids=["mode1", "mode2"])
@pytest.mark.parametrize("span", [(0, 13), (5, 7)], ids=["all_rows", "q_start5"])
@pytest.mark.parametrize("salient", ["changed", "other", "none"])
def test_approx_attention_fast_matches_reference(heads, kv_heads, mask_kind, cached_stats, span, salient):
    q_start, n_q = span
    n, d, bsz = 13, 8, 3
    g = _gen(_seed(heads, kv_heads, mask_kind, cached_stats, span, salient))
    q, k, changed, dv_rows, cached, sal, sal_ctx, k_old = _approx_inputs(
        g, bsz, heads, kv_heads, n, q_start, n_q, d, salient
    )
    mask = _mask(mask_kind, bsz, n, g)
    q_rows = _span(q_start, n_q, bsz)
    extra = (k_old, *_old_stats(q, k, mask, q_rows, g)) if cached_stats else ()
    args = (q, k, changed, dv_rows, cached, sal, sal_ctx, mask, None, *extra)
    got = aa.approx_attention_fast(*args, q_rows=q_rows)
    want = aa.approx_attention_reference(*args, q_rows=q_rows)
    _close(got, want)
    if mask_kind in ("key", "full"):  # fully masked rows: m -inf, l 0, context cached + 0
        dead = torch.isinf(want[2]) & (want[2] < 0)
        assert dead.any() or (mask_kind == "full" and q_start > 0)
        assert torch.equal(dead, torch.isinf(got[2]) & (got[2] < 0)) and (got[3][dead] == 0).all()
    op = ops.approx_attention(q, k, changed, dv_rows, cached, sal, sal_ctx, mask, None, *extra, q_rows=q_rows)
    for x, y in zip(op, got):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_approx_attention_takes_any_query_row_set(mask_kind):
    """Query rows need not be contiguous: a shuffled set with a repeated row (bucket padding)
    gives, slot for slot, what the contiguous span gives for those rows."""
    g = _gen(21)
    bsz, heads, kv_heads, n, d = 2, 4, 2, 11, 8
    q, k, changed, dv_rows, cached, sal, sal_ctx, _ = _approx_inputs(g, bsz, heads, kv_heads, n, 0, n, d, "changed")
    mask = _mask(mask_kind, bsz, n, g)
    full = aa.approx_attention_reference(q, k, changed, dv_rows, cached, sal, sal_ctx, mask, None)
    pick = torch.stack([torch.cat([torch.randperm(n, generator=g)[:6], torch.tensor([3])]) for _ in range(bsz)])
    pick[:, -1] = pick[:, 0]  # a repeat
    q_sub, cached_sub = (t.gather(2, pick[:, None, :, None].expand(-1, heads, -1, d)) for t in (q, cached))
    for fn in (aa.approx_attention_reference, aa.approx_attention_fast):
        got = fn(q_sub, k, changed, dv_rows, cached_sub, sal, sal_ctx, mask, None, q_rows=pick)
        idx = pick[:, None, :, None].expand(-1, heads, -1, d)
        torch.testing.assert_close(got[0], full[0].gather(2, idx), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], full[1].gather(1, pick[..., None].expand(-1, -1, 3)), rtol=1e-5, atol=1e-5)


def test_approx_attention_fast_scale_and_edge_cases():
    g = _gen(11)
    bsz, heads, kv_heads, n, d = 2, 4, 1, 9, 8
    q, k, changed, dv_rows, cached, sal, sal_ctx, k_old = _approx_inputs(g, bsz, heads, kv_heads, n, 2, 6, d, "other")
    mask = _mask("key", bsz, n, g)
    q_rows = _span(2, 6, bsz)
    m_old, l_old = _old_stats(q, k, mask, q_rows, g)
    for extra in [(), (k_old, m_old, l_old)]:
        args = (q, k, changed, dv_rows, cached, sal, sal_ctx, mask, 0.7, *extra)
        _close(aa.approx_attention_fast(*args, q_rows=q_rows), aa.approx_attention_reference(*args, q_rows=q_rows))
    # sorted vs shuffled changed lists give the same result (the repeat test is order free)
    order = changed.argsort(1)
    idx = order[:, None, :, None].expand(-1, kv_heads, -1, d)  # keeps dV / k_old aligned with the slots
    args_sorted = (q, k, changed.gather(1, order), dv_rows.gather(2, idx), cached, sal, sal_ctx, mask, None,
                   k_old.gather(2, idx), m_old, l_old)
    _close(aa.approx_attention_fast(*args_sorted, q_rows=q_rows), aa.approx_attention_reference(*args_sorted, q_rows=q_rows))
    # no changed row at all (mode 1): the context stays the cached one, the stats are exact
    none = changed[:, :0]
    args = (q, k, none, dv_rows[:, :, :0], cached, sal, sal_ctx, mask, None)
    got = aa.approx_attention_fast(*args, q_rows=q_rows)
    _close(got, aa.approx_attention_reference(*args, q_rows=q_rows))
    # ... and in mode 2 (where the reference's max over no column raises): m, l stay the old ones
    got = aa.approx_attention_fast(*args, k_old[:, :, :0], m_old, l_old, q_rows=q_rows)
    torch.testing.assert_close(got[2], m_old)
    torch.testing.assert_close(got[3], l_old)
    # every changed entry dropped (-1): cached context, the old stats
    drop = torch.full_like(changed, -1)
    args = (q, k, drop, dv_rows, cached, sal, sal_ctx, mask, None, k_old, m_old, l_old)
    _close(aa.approx_attention_fast(*args, q_rows=q_rows), aa.approx_attention_reference(*args, q_rows=q_rows))
    # 16-bit inputs: ctx in cached's dtype, fp32 stats
    half = [x.half() for x in (q, k, dv_rows, cached, sal_ctx)]
    args = (half[0], half[1], changed, half[2], half[3], sal, half[4], mask, None)
    got, want = aa.approx_attention_fast(*args, q_rows=q_rows), aa.approx_attention_reference(*args, q_rows=q_rows)
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got[1:], want[1:], rtol=1e-4, atol=1e-4)


def test_approx_attention_fast_rejects_what_the_reference_rejects():
    g = _gen(3)
    q, k, changed, dv_rows, cached, sal, sal_ctx, k_old = _approx_inputs(g, 2, 2, 2, 7, 0, 7, 4, "none")
    per_head = torch.ones(2, 2, 1, 7, dtype=torch.bool)
    for fn in (aa.approx_attention_fast, aa.approx_attention_reference):
        with pytest.raises(NotImplementedError):
            fn(q, k, changed, dv_rows, cached, sal, sal_ctx, per_head, None)
        with pytest.raises(ValueError):  # q_rows must be (B, Nq)
            fn(q, k, changed, dv_rows, cached, sal, sal_ctx, None, None, q_rows=_span(1, 6, 2))


_VIEWS = {"view", "_unsafe_view", "unsqueeze", "squeeze", "expand", "select", "slice", "narrow", "transpose",
          "t", "permute", "as_strided", "alias", "_reshape_alias", "scalar_tensor"}


def _count_aten_ops(fn):
    """The aten ops ``fn`` runs that do work (views and scalar wrapping left out)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _VIEWS:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_fast_paths_issue_fewer_ops(kv_heads):
    """The point of the fast paths: fewer, larger torch ops than the references (loose bounds)."""
    g = _gen(4)
    bsz, heads, n, d = 4, 4, 24, 8
    inputs = _approx_inputs(g, bsz, heads, kv_heads, n, 5, 16, d, "changed")
    q, k, changed, dv_rows, cached, sal, sal_ctx, k_old = inputs
    mask = _mask("key", bsz, n, g)
    q_rows = _span(5, 16, bsz)
    m_old, l_old = _old_stats(q, k, mask, q_rows, g)
    for extra in [(), (k_old, m_old, l_old)]:
        args = (q, k, changed, dv_rows, cached, sal, sal_ctx, mask, None, *extra)
        fast = _count_aten_ops(lambda: aa.approx_attention_fast(*args, q_rows=q_rows))
        ref = _count_aten_ops(lambda: aa.approx_attention_reference(*args, q_rows=q_rows))
        assert fast <= 0.7 * ref, (fast, ref)
    v = torch.randn(k.shape, generator=g)
    q_rows, rows = q[:, :, :5], changed[:, :5].clamp(0, n - 1)
    fast = _count_aten_ops(lambda: pa.partial_attention_stats_fast(q_rows, k, v, rows, mask, None))
    ref = _count_aten_ops(lambda: pa.partial_attention_stats_reference(q_rows, k, v, rows, mask, None))
    assert fast < ref, (fast, ref)
