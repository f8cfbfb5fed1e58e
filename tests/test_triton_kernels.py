"""The Triton kernels (kernels/*.py) against their torch references, and the new dyllm:: ops.

The kernel comparisons run the Triton launchers (``triton_*``) on CPU tensors through the Triton
interpreter: they need ``triton`` importable and TRITON_INTERPRET=1 set before the kernels are
imported (CI sets it for the whole run). Shapes are tiny on purpose: the interpreter is slow.
The op checks (opcheck, export, approximation error) run on the references and need neither.
"""

from __future__ import annotations

import math

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dyllm_fx.kernels import approx_attention as aa
from dyllm_fx.kernels import cache_scatter as cs
from dyllm_fx.kernels import partial_attention as pa
from dyllm_fx.kernels import salient_rows as sa
from dyllm_fx.kernels._triton import HAS_TRITON, INTERPRET
from dyllm_fx.kernels.gathered_mlp import gathered_rows_apply
from dyllm_fx.kernels.dispatch import gather_rows

ops = torch.ops.dyllm

needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRET),
    reason="Triton-vs-reference comparisons run the kernels on CPU through the Triton interpreter: "
    + ("`import triton` failed" if not HAS_TRITON else "TRITON_INTERPRET=1 was not set when the kernels were imported"),
)
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LENGTHS = st.sampled_from([5, 7, 13])



def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rows(bsz, n, seq_len, g):
    """(B, n) distinct positions per batch element, unsorted."""
    return torch.stack([torch.randperm(seq_len, generator=g)[:n] for _ in range(bsz)])


def _mask(kind, bsz, seq_len, g):
    if kind == "key":
        mask = torch.ones(bsz, 1, 1, seq_len, dtype=torch.bool)
        mask[-1, ..., : min(3, seq_len - 1)] = False  # left padding on the last batch element
        return mask
    if kind == "full":
        mask = torch.rand(bsz, 1, seq_len, seq_len, generator=g) > 0.3
        mask[..., 0] = True  # no fully masked query row
        return mask
    if kind == "float":
        return torch.randn(1, 1, 1, seq_len, generator=g)  # additive, broadcast over the batch
    return None


def _close(got, want, tol=1e-5):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# --- cache scatter ---------------------------------------------------------------------------


@needs_triton
@SETTINGS
@given(seq_len=LENGTHS, bsz=st.integers(1, 2), heads=st.integers(1, 3), d=st.sampled_from([3, 8]),
       frac=st.floats(0, 1), dim=st.sampled_from([1, 2]), repeat=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_cache_write_rows_matches_reference(seq_len, bsz, heads, d, frac, dim, repeat, seed):
    g = _gen(seed)
    n = max(1, round(frac * seq_len))  # 1 row .. all rows
    rows = _rows(bsz, n, seq_len, g)
    shape = (bsz, heads, seq_len, d) if dim == 2 else (bsz, seq_len, heads * d)
    cache = torch.randn(shape, generator=g)
    values = torch.randn(*shape[:dim], n, *shape[dim + 1:], generator=g)
    if repeat:  # padding by repeating the last row (identical values)
        rows = torch.cat([rows, rows[:, -1:]], 1)
        values = torch.cat([values, values.narrow(dim, n - 1, 1)], dim)
    want = cache.clone()
    cs.cache_write_rows_reference(want, rows, values, dim)
    cs.triton_cache_write_rows(cache, rows, values, dim)
    assert torch.equal(cache, want)


# --- partial attention -----------------------------------------------------------------------


@needs_triton
@SETTINGS
@given(seq_len=LENGTHS, bsz=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2]),
       frac=st.floats(0, 1), d=st.sampled_from([4, 8]), mask_kind=st.sampled_from([None, "key", "full", "float"]),
       scale=st.sampled_from([None, 0.3]), seed=st.integers(0, 2**16))
def test_triton_partial_attention_matches_reference(seq_len, bsz, kv_heads, group, frac, d, mask_kind, scale, seed):
    g = _gen(seed)
    n = max(1, round(frac * seq_len))
    heads = kv_heads * group
    rows = _rows(bsz, n, seq_len, g)
    q = torch.randn(bsz, heads, n, d, generator=g)
    k, v = torch.randn(2, bsz, kv_heads, seq_len, d, generator=g)
    mask = _mask(mask_kind, bsz, seq_len, g)
    out, m, l = pa.triton_partial_attention(q, k, v, rows, mask, scale, return_stats=True)
    want, want_m, want_l = pa.partial_attention_stats_reference(q, k, v, rows, mask, scale)
    _close(out, want)
    _close(m, want_m)
    _close(l, want_l)
    assert out.is_contiguous()
    _close(pa.triton_partial_attention(q, k, v, rows, mask, scale), want)  # the op's form: output only


def test_partial_attention_stats_are_the_log_sum_exp():
    g = _gen(3)
    q, k, v = (torch.randn(s, generator=g) for s in [(2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8)])
    rows = _rows(2, 5, 7, g)
    per_head = torch.rand(2, 4, 1, 7, generator=g) > 0.3  # not a kernel layout: the reference path
    per_head[..., 0] = True
    for mask in (_mask("key", 2, 7, g), per_head):
        out, m, l = ops.partial_attention_stats(q, k, v, rows, mask, None)
        s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(8)
        s = s.masked_fill(~mask, float("-inf"))
        _close(m + l.log(), torch.logsumexp(s, -1))
        _close(out, ops.partial_attention(q, k, v, rows, mask, None))
        if HAS_TRITON and INTERPRET:  # falls back to the reference for the per-head mask
            for x, y in zip(pa.triton_partial_attention(q, k, v, rows, mask, None, return_stats=True), (out, m, l)):
                _close(x, y)


# --- saliency --------------------------------------------------------------------------------


@needs_triton
@SETTINGS
@given(n_rows=LENGTHS, bsz=st.integers(1, 2), heads=st.sampled_from([0, 1, 3]), d=st.sampled_from([5, 8]),
       tau=st.floats(-0.5, 1.0), bounds=st.tuples(st.floats(0, 1), st.floats(0, 1)), seed=st.integers(0, 2**16))
def test_triton_saliency_matches_reference(n_rows, bsz, heads, d, tau, bounds, seed):
    g = _gen(seed)
    start, end = sorted(round(b * n_rows) for b in bounds)
    shape = (bsz, n_rows, d) if heads == 0 else (bsz, heads, n_rows, d)  # heads 0: the (B, N, D) layout
    new = torch.randn(shape, generator=g)
    cached = new + torch.rand(()).item() * torch.randn(shape, generator=g)
    indices, count, cos = sa.triton_saliency(new, cached, tau, start, end)
    _, _, want_cos = sa.saliency_reference(new, cached, tau, start, end)
    _close(cos, want_cos)
    # The compaction, exactly, on the kernel's own cosines (no flips at cos == tau by rounding).
    want_idx, want_count = sa.select_salient_reference(cos, tau, start, end)
    assert torch.equal(indices, want_idx) and torch.equal(count, want_count)
    assert indices.shape == (bsz, end - start) and count.dtype == torch.int64


def test_saliency_reference_semantics():
    g = _gen(5)
    new = torch.randn(2, 3, 9, 4, generator=g)
    cached = new.clone()
    cached[0, :, [2, 6]] = torch.randn(3, 2, 4, generator=g)  # rows 2 and 6 move in batch 0
    cached[1, :, [1, 8]] = torch.randn(3, 2, 4, generator=g)  # row 1 (outside the range) and 8
    indices, count, cos = ops.saliency(new, cached, 0.99, 2, 9)
    assert count.tolist() == [2, 1]
    assert indices.tolist() == [[2, 6, -1, -1, -1, -1, -1], [8, -1, -1, -1, -1, -1, -1]]
    flat = lambda x: x.transpose(1, 2).flatten(2)  # noqa: E731
    _close(cos, F.cosine_similarity(flat(new), flat(cached), dim=-1))
    with pytest.raises(ValueError):
        ops.saliency(new, cached, 0.9, 5, 10)


# --- approximate attention -------------------------------------------------------------------


def _approx_inputs(bsz, kv_heads, group, n_rows, n_changed, d, g, salient="changed", pad=False):
    heads = kv_heads * group
    q = torch.randn(bsz, heads, n_rows, d, generator=g)
    k = torch.randn(bsz, kv_heads, n_rows, d, generator=g)
    changed = _rows(bsz, n_changed, n_rows, g)
    dv_rows = 0.1 * torch.randn(bsz, kv_heads, n_changed, d, generator=g)
    cached = torch.randn(bsz, heads, n_rows, d, generator=g)
    if pad:  # a repeat of the last row (same dV) and a -1 slot
        changed = torch.cat([changed, changed[:, -1:], torch.full((bsz, 1), -1)], 1)
        dv_rows = torch.cat([dv_rows, dv_rows[:, :, -1:], torch.randn(bsz, kv_heads, 1, d, generator=g)], 2)
    sal = changed if salient == "changed" else _rows(bsz, max(1, n_rows // 3), n_rows, g)
    if salient == "none":
        sal = sal[:, :0]
    sal_ctx = torch.randn(bsz, heads, sal.shape[1], d, generator=g)
    if pad and salient == "changed":
        sal_ctx[:, :, -2] = sal_ctx[:, :, -3]  # the repeated row carries the same context
    return q, k, changed, dv_rows, cached, sal, sal_ctx


@needs_triton
@SETTINGS
@given(n_rows=LENGTHS, bsz=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2]),
       frac=st.floats(0, 1), mask_kind=st.sampled_from([None, "key", "full"]),
       salient=st.sampled_from(["changed", "other", "none"]), pad=st.booleans(), cached_stats=st.booleans(),
       seed=st.integers(0, 2**16))
def test_triton_approx_attention_matches_reference(
    n_rows, bsz, kv_heads, group, frac, mask_kind, salient, pad, cached_stats, seed
):
    g = _gen(seed)
    n_changed = max(1, round(frac * n_rows))
    args = _approx_inputs(bsz, kv_heads, group, n_rows, n_changed, 8, g, salient, pad)
    mask = _mask(mask_kind, bsz, n_rows, g)
    extra = ()
    if cached_stats:
        q, k = args[:2]
        k_old = k.gather(2, args[2].clamp_min(0)[:, None, :, None].expand(-1, kv_heads, -1, 8))
        k_old = k_old + 0.1 * torch.randn(k_old.shape, generator=g)
        s = pa.scores_reference(q, k, pa.attention_bias(mask, None, bsz, n_rows), 1 / math.sqrt(8))
        extra = (k_old, *pa.softmax_stats(s + 0.05 * torch.randn(s.shape, generator=g)))
    got = aa.triton_approx_attention(*args, mask, None, *extra)
    want = aa.approx_attention_reference(*args, mask, None, *extra)
    for x, y in zip(got, want):
        _close(x, y)


@SETTINGS
@given(n_rows=st.integers(3, 17), mask_kind=st.sampled_from([None, "key", "full"]), cached_stats=st.booleans(),
       seed=st.integers(0, 2**16), data=st.data())
def test_approx_attention_query_range_equals_slice_of_all_rows(n_rows, mask_kind, cached_stats, seed, data):
    """Querying only rows [q0, q1) gives exactly those rows of the all-rows call (reference and,
    where Triton imports, the kernel); so does any row set, here the span reversed with a repeat."""
    g = _gen(seed)
    q0 = data.draw(st.integers(0, n_rows - 1))
    q1 = data.draw(st.integers(q0 + 1, n_rows))
    args = list(_approx_inputs(2, 2, 2, n_rows, max(1, n_rows // 3), 8, g, "other"))
    mask = _mask(mask_kind, 2, n_rows, g)
    extra = [None, None, None]
    if cached_stats:
        k_old = args[1].gather(2, args[2][:, None, :, None].expand(-1, 2, -1, 8)) + 0.1
        s = pa.scores_reference(args[0], args[1], pa.attention_bias(mask, None, 2, n_rows), 1 / math.sqrt(8))
        extra = [k_old, *pa.softmax_stats(s)]
    full = aa.approx_attention_reference(*args, mask, None, *extra)
    sub = list(args)
    sub[0], sub[4] = args[0][:, :, q0:q1], args[4][:, :, q0:q1]
    sub_extra = extra if not cached_stats else [extra[0], extra[1][:, :, q0:q1], extra[2][:, :, q0:q1]]
    want = (full[0][:, :, q0:q1], full[1][:, q0:q1], full[2][:, :, q0:q1], full[3][:, :, q0:q1])
    impls = [aa.approx_attention_reference] + ([aa.triton_approx_attention] if HAS_TRITON and INTERPRET else [])
    q_rows = torch.arange(q0, q1).expand(2, -1)
    for impl in impls:
        for x, y in zip(impl(*sub, mask, None, *sub_extra, q_rows=q_rows), want):
            _close(x, y)
    pick = torch.cat([torch.arange(q1 - 1, q0 - 1, -1), torch.tensor([q0])])  # reversed, then q0 again
    rows = pick.expand(2, -1)
    sub[0], sub[4] = args[0][:, :, pick], args[4][:, :, pick]
    sub_extra = extra if not cached_stats else [extra[0], extra[1][:, :, pick], extra[2][:, :, pick]]
    want = (full[0][:, :, pick], full[1][:, pick], full[2][:, :, pick], full[3][:, :, pick])
    for impl in impls:
        for x, y in zip(impl(*sub, mask, None, *sub_extra, q_rows=rows), want):
            _close(x, y)


@needs_triton
def test_triton_kernels_in_half_precision():
    """16-bit inputs (fp32 accumulation inside). fp16 only: the interpreter's tl.dot mishandles
    bf16 (numpy has no bf16), so the bf16 path is left to a GPU run."""
    g = _gen(21)
    half = torch.float16
    q, k, v = (torch.randn(s, generator=g).to(half) for s in [(2, 4, 3, 8), (2, 2, 7, 8), (2, 2, 7, 8)])
    rows, mask = _rows(2, 3, 7, g), _mask("key", 2, 7, g)
    out = pa.triton_partial_attention(q, k, v, rows, mask, None)
    assert out.dtype == half
    _close(out.float(), pa.partial_attention_reference(q, k, v, rows, mask, None).float(), 2e-3)
    args = tuple(x.to(half) if x.is_floating_point() else x for x in _approx_inputs(2, 2, 2, 7, 3, 8, g))
    for x, y in zip(aa.triton_approx_attention(*args, mask, None), aa.approx_attention_reference(*args, mask, None)):
        assert x.dtype == y.dtype
        _close(x.float(), y.float(), 2e-3)


def _changed_step(
    seed=0, bsz=2, kv_heads=2, group=2, n_rows=13, d=8, n_changed=3, eps=0.05, mask_kind="key", k_eps=None
):
    """One denoising step where a few rows change slightly (q, K, V of those rows by ``eps``
    relative noise, K by ``k_eps`` if given): (op args, exact new context, old (K rows, m, l))."""
    k_eps = eps if k_eps is None else k_eps
    g = _gen(seed)
    heads = kv_heads * group
    q = torch.randn(bsz, heads, n_rows, d, generator=g)
    k = torch.randn(bsz, kv_heads, n_rows, d, generator=g)
    v = torch.randn(bsz, kv_heads, n_rows, d, generator=g)
    mask = _mask(mask_kind, bsz, n_rows, g)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)  # noqa: E731
    cached_ctx = sdpa(q, k, v)
    changed = _rows(bsz, n_changed, n_rows, g)
    k_new, v_new, q_new = k.clone(), v.clone(), q.clone()
    for b in range(bsz):
        r = changed[b]
        k_new[b][:, r] += k_eps * torch.randn(kv_heads, n_changed, d, generator=g)
        v_new[b][:, r] += eps * torch.randn(kv_heads, n_changed, d, generator=g)
        q_new[b][:, r] += eps * torch.randn(heads, n_changed, d, generator=g)
    exact = sdpa(q_new, k_new, v_new)
    dv_rows = gather_rows(v_new, changed, 2) - gather_rows(v, changed, 2)
    args = (q_new, k_new, changed, dv_rows, cached_ctx, changed, gather_rows(exact, changed, 2), mask, None)
    old_bias = pa.attention_bias(mask, None, bsz, n_rows)
    old_stats = pa.softmax_stats(pa.scores_reference(q, k, old_bias, 1 / math.sqrt(d)))
    return args, exact, (gather_rows(k, changed, 2), *old_stats)


def _row_error(got, exact):
    """Per-row error relative to the row's context norm (heads concatenated)."""
    flat = lambda x: x.transpose(1, 2).flatten(2)  # noqa: E731
    return (flat(got) - flat(exact)).norm(dim=-1) / flat(exact).norm(dim=-1)


@pytest.mark.parametrize("mask_kind", [None, "key"])
def test_approx_attention_error_against_exact_attention(mask_kind):
    eps = 0.05
    args, exact, _ = _changed_step(mask_kind=mask_kind, eps=eps)
    ctx, stats, m, l = ops.approx_attention(*args)
    err = _row_error(ctx, exact)
    stale = _row_error(args[4], exact)  # keeping the cached context unchanged
    changed = args[2]
    for b in range(changed.shape[0]):
        assert err[b, changed[b]].max() < 1e-6  # salient rows: the exact context
    # 3 of 13 rows moved by 5%: the dropped term (P_new - P_old) V_old is first order in the
    # key change, measured ~1.1 eps at worst (and ~0.35 eps on average) on this data.
    assert err.max() < 1.5 * eps, err.max()
    assert err.mean() < 0.6 * stale.mean()  # the dV correction beats keeping the stale context
    # Keys unchanged (only V moved): the approximation drops nothing and is exact.
    args_v, exact_v, _ = _changed_step(mask_kind=mask_kind, eps=eps, k_eps=0.0)
    assert _row_error(ops.approx_attention(*args_v)[0], exact_v).max() < 1e-5
    # The statistics are the cosine terms of the returned context against the cached one.
    flat = lambda x: x.transpose(1, 2).flatten(2)  # noqa: E731
    _close(sa.cosine_from_stats(*stats.unbind(-1)), F.cosine_similarity(flat(ctx), flat(args[4]), dim=-1))
    # m, l: this step's exact softmax statistics.
    bias = pa.attention_bias(args[7], None, 2, 13)
    want_m, want_l = pa.softmax_stats(pa.scores_reference(args[0], args[1], bias, 8**-0.5))
    _close(m, want_m)
    _close(l, want_l)
    if HAS_TRITON and INTERPRET:
        for x, y in zip(aa.triton_approx_attention(*args), (ctx, stats, m, l)):
            _close(x, y)


def test_approx_attention_cached_stats_mode():
    """Mode 2 reuses last step's (m, l): on rows whose q did not change it equals mode 1."""
    args, exact, old = _changed_step(seed=1)
    full = ops.approx_attention(*args)
    cheap = ops.approx_attention(*args, *old)
    keep = torch.ones(2, 13, dtype=torch.bool).scatter_(1, args[2], False)  # rows with unchanged q
    _close(cheap[0].transpose(1, 2)[keep], full[0].transpose(1, 2)[keep])
    # m is only the stabilizer (mode 2 keeps an old max that may have dropped): compare log-sum-exp.
    lse = lambda out: (out[2] + out[3].log()).transpose(1, 2)[keep]  # noqa: E731
    _close(lse(cheap), lse(full))
    assert _row_error(cheap[0], exact).max() < 0.075
    if HAS_TRITON and INTERPRET:
        for x, y in zip(aa.triton_approx_attention(*args, *old), cheap):
            _close(x, y)


def test_unique_rows_and_slots():
    rows = torch.tensor([[4, 1, 4, -1, 9], [0, 0, 0, 2, 3]])
    assert aa.unique_rows(rows, 5).tolist() == [[4, 1, -1, -1, -1], [0, -1, -1, 2, 3]]
    slots = aa.salient_slots(torch.tensor([[3, -1, 0]]), 5)
    assert slots.tolist() == [[2, -1, -1, 0, -1]]


# --- gathered MLP (torch path) ---------------------------------------------------------------


def test_gathered_rows_apply():
    g = _gen(7)
    h = torch.randn(2, 7, 6, generator=g)
    lin = torch.nn.Linear(6, 4)
    rows = torch.tensor([[5, 0, 2], [1, 6, 6]])
    out = torch.zeros(2, 7, 4)
    with torch.no_grad():
        assert gathered_rows_apply(lin, h, rows, out) is out
        dense = lin(h)
    for b in range(2):
        _close(out[b, rows[b]], dense[b, rows[b]])
    untouched = torch.ones(2, 7, dtype=torch.bool).scatter_(1, rows, False)
    assert (out[untouched] == 0).all()


# --- registration: opcheck, export, the CUDA kernels -----------------------------------------


@pytest.mark.parametrize("layout", ["heads", "rows"])
def test_opcheck_saliency(layout):
    g = _gen(11)
    shape = (2, 3, 7, 4) if layout == "heads" else (2, 7, 12)
    new = torch.randn(shape, generator=g)
    torch.library.opcheck(ops.saliency.default, (new, new + torch.randn(shape, generator=g), 0.8, 2, 6))


@pytest.mark.parametrize("mask_kind, scale", [(None, None), ("key", 0.3), ("full", None)])
def test_opcheck_partial_attention_stats(mask_kind, scale):
    g = _gen(12)
    q, k, v = (torch.randn(s, generator=g) for s in [(2, 4, 3, 8), (2, 2, 7, 8), (2, 2, 7, 8)])
    args = (q, k, v, _rows(2, 3, 7, g), _mask(mask_kind, 2, 7, g), scale)
    torch.library.opcheck(ops.partial_attention_stats.default, args)


@pytest.mark.parametrize("cached_stats", [False, True])
def test_opcheck_approx_attention(cached_stats):
    args, _, old = _changed_step(seed=2, n_rows=7, n_changed=2)
    torch.library.opcheck(ops.approx_attention.default, args + (old if cached_stats else ()))


def test_export_keeps_the_ops():
    class Step(torch.nn.Module):
        def forward(self, q, k, changed, dv_rows, cached_ctx, mask):
            salient_ctx = cached_ctx[:, :, :2]
            ctx, stats, m, l = ops.approx_attention(q, k, changed, dv_rows, cached_ctx, changed, salient_ctx, mask, None)
            indices, count, cos = ops.saliency(ctx, cached_ctx, 0.9, 2, 7)
            return ctx, indices, count

    args, _, _ = _changed_step(seed=3, n_rows=7, n_changed=2)
    q, k, changed, dv_rows, cached_ctx, *_ = args
    ep = torch.export.export(Step(), (q, k, changed, dv_rows, cached_ctx, args[7]))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert {ops.approx_attention.default, ops.saliency.default} <= targets
    got = ep.module()(q, k, changed, dv_rows, cached_ctx, args[7])
    for x, y in zip(got, Step()(q, k, changed, dv_rows, cached_ctx, args[7])):
        assert torch.equal(x, y)


@pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("DYLLM_TRITON") == "0",
    reason="the CUDA (Triton) kernels register only with triton importable and without DYLLM_TRITON=0",
)
@pytest.mark.parametrize(
    "name", ["cache_write_rows", "partial_attention", "partial_attention_stats", "saliency", "approx_attention"]
)
def test_cuda_kernels_are_registered(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dyllm::{name}", "CUDA")
