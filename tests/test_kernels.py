"""The kernels and the dyllm:: ops, against their references, on every device.

* The ops: the ``torch.ops.dyllm.*`` registrations (kernels/dispatch.py) and the references' own
  semantics.
* The Triton kernels: each Triton launcher (``triton_*``) against its torch reference. On CPU the
  kernels run through the Triton interpreter: they need ``triton`` importable and
  TRITON_INTERPRET=1 set before the kernels are imported (CI sets it for the whole run), and
  shapes stay tiny because the interpreter is slow. The same tests run compiled on CUDA (the
  ``cuda`` marker: ``pytest -m cuda``), skipped where there is no GPU. The op checks (opcheck,
  export, approximation error) run on the references.
* The lean CPU paths (``partial_attention_stats_fast``,
  ``approx_attention_fast``) against the references they replace as the ops' default
  implementation, in fp32 with tight tolerances.
"""

from __future__ import annotations

import math
import os
import zlib

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
from dyllm_fx.kernels.dispatch import gather_rows

# ==========================================================================================
# the ops: registrations and the references' semantics
# ==========================================================================================
ops = torch.ops.dyllm


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rows(bsz, n, seq_len, seed=0):
    """(B, n) distinct positions per batch element, unsorted."""
    g = _gen(seed)
    return torch.stack([torch.randperm(seq_len, generator=g)[:n] for _ in range(bsz)])


def _qkv(bsz, heads, kv_heads, n_q, seq_len, d=8, seed=0):
    g = _gen(seed)
    return (
        torch.randn(bsz, heads, n_q, d, generator=g),
        torch.randn(bsz, kv_heads, seq_len, d, generator=g),
        torch.randn(bsz, kv_heads, seq_len, d, generator=g),
    )


def _key_mask(bsz, seq_len):
    mask = torch.ones(bsz, 1, 1, seq_len, dtype=torch.bool)
    mask[-1, ..., :3] = False  # left padding on the last row
    return mask


def _full_mask(bsz, seq_len, seed=0):
    mask = torch.rand(bsz, 1, seq_len, seq_len, generator=_gen(seed)) > 0.3
    mask[..., 0] = True  # no fully masked query row
    return mask


@pytest.mark.parametrize("dim", [1, 2])
def test_opcheck_cache_write_rows(dim):
    rows = _rows(2, 3, 7)
    if dim == 2:  # (B, KV, L, d) K/V caches
        cache, values = torch.randn(2, 2, 7, 4), torch.randn(2, 2, 3, 4)
    else:  # (B, L, D) hidden states
        cache, values = torch.randn(2, 7, 5), torch.randn(2, 3, 5)
    torch.library.opcheck(ops.cache_write_rows.default, (cache, rows, values, dim))


@pytest.mark.parametrize(
    "heads, kv_heads, mask_kind, scale",
    [(4, 4, None, None), (4, 2, "key", None), (4, 1, "full", 0.5), (2, 2, "key", 0.25)],
)
def test_opcheck_partial_attention(heads, kv_heads, mask_kind, scale):
    bsz, seq_len = 2, 9
    rows = _rows(bsz, 4, seq_len, seed=1)
    q, k, v = _qkv(bsz, heads, kv_heads, 4, seq_len)
    mask = {None: None, "key": _key_mask(bsz, seq_len), "full": _full_mask(bsz, seq_len)}[mask_kind]
    torch.library.opcheck(ops.partial_attention.default, (q, k, v, rows, mask, scale))


def test_cache_write_rows_writes_only_the_rows():
    cache = torch.randn(2, 2, 7, 4, generator=_gen(1))
    before = cache.clone()
    rows = torch.tensor([[5, 0], [3, 6]])
    values = torch.randn(2, 2, 2, 4, generator=_gen(2))
    assert ops.cache_write_rows(cache, rows, values, 2) is None
    expected = before.clone()
    for b in range(2):
        expected[b, :, rows[b]] = values[b]
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("mask_kind", [None, "key", "full"])
def test_partial_attention_all_rows_is_sdpa(kv_heads, mask_kind):
    bsz, heads, seq_len = 2, 4, 9
    q, k, v = _qkv(bsz, heads, kv_heads, seq_len, seq_len, seed=3)
    mask = {None: None, "key": _key_mask(bsz, seq_len), "full": _full_mask(bsz, seq_len)}[mask_kind]
    rows = torch.arange(seq_len).expand(bsz, -1)
    got = ops.partial_attention(q, k, v, rows, mask, None)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != heads)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got.is_contiguous()


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("mask_kind", [None, "key", "full"])
def test_partial_attention_subset_is_rows_of_full(kv_heads, mask_kind):
    bsz, heads, seq_len = 2, 4, 9
    q_all, k, v = _qkv(bsz, heads, kv_heads, seq_len, seq_len, seed=4)
    mask = {None: None, "key": _key_mask(bsz, seq_len), "full": _full_mask(bsz, seq_len, seed=5)}[mask_kind]
    full = F.scaled_dot_product_attention(
        q_all, k, v, attn_mask=mask, scale=0.3, enable_gqa=kv_heads != heads
    )
    rows = _rows(bsz, 4, seq_len, seed=6)
    q = gather_rows(q_all, rows, 2)
    got = ops.partial_attention(q, k, v, rows, mask, 0.3)
    assert got.shape == (bsz, heads, 4, 8)
    torch.testing.assert_close(got, gather_rows(full, rows, 2), rtol=0, atol=1e-6)


def test_gather_rows():
    x = torch.randn(2, 3, 7, 4, generator=_gen(7))
    rows = torch.tensor([[6, 0, 2], [1, 1, 5]])  # repeats are allowed
    got = gather_rows(x, rows, 2)
    assert got.shape == (2, 3, 3, 4)
    for b in range(2):
        assert torch.equal(got[b], x[b][:, rows[b]])
    h = torch.randn(2, 7, 5, generator=_gen(8))
    assert torch.equal(gather_rows(h, rows, 1)[1], h[1, rows[1]])


def test_gather_rows_broadcasts_a_batch_one_table():
    table = torch.randn(1, 1, 7, 4, generator=_gen(9))  # e.g. RoPE cos for shared positions
    rows = torch.tensor([[6, 0, 2], [1, 3, 5], [4, 4, 0]])
    got = gather_rows(table, rows, 2)
    assert got.shape == (3, 1, 3, 4)
    for b in range(3):
        assert torch.equal(got[b, 0], table[0, 0, rows[b]])


def test_dispatch_functions_equal_the_ops_on_cpu():
    # kernels/dispatch.py's functions call the plain-torch implementation for CPU tensors: the same
    # results as the registered op (which CUDA tensors take).
    from dyllm_fx.kernels import dispatch

    bsz, heads, kv_heads, seq_len, d = 2, 4, 2, 12, 8
    q, k, v = _qkv(bsz, heads, kv_heads, 3, seq_len, d)
    rows = _rows(bsz, 3, seq_len)
    mask = _key_mask(bsz, seq_len)
    got = dispatch.partial_attention_stats(q, k, v, rows, mask, None)
    for a, b in zip(got, ops.partial_attention_stats(q, k, v, rows, mask, None)):
        torch.testing.assert_close(a, b)
    qa = torch.randn(bsz, heads, 5, d, generator=_gen(1))
    dv = torch.randn(bsz, kv_heads, 3, d, generator=_gen(2))
    cached = torch.randn(bsz, heads, 5, d, generator=_gen(3))
    exact = torch.randn(bsz, heads, 3, d, generator=_gen(4))
    changed = torch.tensor([[7, 8, 8], [4, 6, 9]])
    q_rows = torch.arange(4, 9).expand(bsz, -1)
    args = (qa, k, changed, dv, cached, changed, exact, mask, None)
    for a, b in zip(
        dispatch.approx_attention(*args, q_rows=q_rows), ops.approx_attention(*args, q_rows=q_rows)
    ):
        torch.testing.assert_close(a, b)
    c1, c2 = torch.zeros(bsz, kv_heads, seq_len, d), torch.zeros(bsz, kv_heads, seq_len, d)
    dispatch.cache_write_rows(c1, rows, v[:, :, :3], 2)
    ops.cache_write_rows(c2, rows, v[:, :, :3], 2)
    torch.testing.assert_close(c1, c2)
    assert (
        dispatch.approx_attention.op._qualname == "dyllm::approx_attention"
    )  # CUDA tensors take the registered op


def test_one_table_names_every_registered_op():
    from dyllm_fx.kernels.dispatch import KERNELS, REGISTERED

    assert (
        set(KERNELS)
        == set(REGISTERED)
        == {
            "cache_write_rows",
            "partial_attention",
            "partial_attention_stats",
            "approx_attention",
        }
    )


# ==========================================================================================
# the Triton kernels against their references, on every device
# ==========================================================================================
# The devices the Triton-vs-reference comparisons run on: the CPU through the Triton
# interpreter, CUDA compiled (``pytest -m cuda`` on a GPU machine, without TRITON_INTERPRET).
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KERNEL_DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not (HAS_TRITON and INTERPRET),
            reason="on CPU the Triton kernels run through the Triton interpreter: "
            + (
                "`import triton` failed"
                if not HAS_TRITON
                else "TRITON_INTERPRET=1 was not set when the kernels were imported"
            ),
        ),
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            NO_CUDA,
            pytest.mark.skipif(
                not HAS_TRITON or INTERPRET,
                reason="compiled kernels on CUDA need triton and TRITON_INTERPRET unset",
            ),
        ],
    ),
]
on_kernel_devices = pytest.mark.parametrize("device", KERNEL_DEVICES)
# Ops that dispatch by device: the plain-torch path on CPU, the Triton registration on CUDA.
OP_DEVICES = pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NO_CUDA])]
)
# GPU fp32 sums run in another order than the reference's; 16-bit inputs round on the way in.
KERNEL_TOL = {"cpu": 1e-5, "cuda": 1e-4}
HALF_TOL = {torch.float16: 2e-2, torch.bfloat16: 3e-2}
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LENGTHS = st.sampled_from([5, 7, 13])


def _tk_gen(seed):
    return torch.Generator().manual_seed(seed)


def _tk_rows(bsz, n, seq_len, g):
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


def _on(device, *tensors):
    """The tensors (built on the CPU from a seeded generator) on ``device``; None stays None."""
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors)


# --- cache scatter ---------------------------------------------------------------------------


@on_kernel_devices
@SETTINGS
@given(
    seq_len=LENGTHS,
    bsz=st.integers(1, 2),
    heads=st.integers(1, 3),
    d=st.sampled_from([3, 8]),
    frac=st.floats(0, 1),
    dim=st.sampled_from([1, 2]),
    repeat=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_cache_write_rows_matches_reference(device, seq_len, bsz, heads, d, frac, dim, repeat, seed):
    g = _tk_gen(seed)
    n = max(1, round(frac * seq_len))  # 1 row .. all rows
    rows = _tk_rows(bsz, n, seq_len, g)
    shape = (bsz, heads, seq_len, d) if dim == 2 else (bsz, seq_len, heads * d)
    cache = torch.randn(shape, generator=g)
    values = torch.randn(*shape[:dim], n, *shape[dim + 1 :], generator=g)
    if repeat:  # padding by repeating the last row (identical values)
        rows = torch.cat([rows, rows[:, -1:]], 1)
        values = torch.cat([values, values.narrow(dim, n - 1, 1)], dim)
    cache, rows, values = _on(device, cache, rows, values)
    want = cache.clone()
    cs.cache_write_rows_reference(want, rows, values, dim)
    cs.triton_cache_write_rows(cache, rows, values, dim)
    assert torch.equal(cache, want)


# --- partial attention -----------------------------------------------------------------------


@on_kernel_devices
@SETTINGS
@given(
    seq_len=LENGTHS,
    bsz=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    frac=st.floats(0, 1),
    d=st.sampled_from([4, 8]),
    mask_kind=st.sampled_from([None, "key", "full", "float"]),
    scale=st.sampled_from([None, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_triton_partial_attention_matches_reference(
    device, seq_len, bsz, kv_heads, group, frac, d, mask_kind, scale, seed
):
    g = _tk_gen(seed)
    n = max(1, round(frac * seq_len))
    heads = kv_heads * group
    rows = _tk_rows(bsz, n, seq_len, g)
    q = torch.randn(bsz, heads, n, d, generator=g)
    k, v = torch.randn(2, bsz, kv_heads, seq_len, d, generator=g)
    q, k, v, rows, mask = _on(device, q, k, v, rows, _mask(mask_kind, bsz, seq_len, g))
    out, m, l = pa.triton_partial_attention(q, k, v, rows, mask, scale, return_stats=True)
    want, want_m, want_l = pa.partial_attention_stats_reference(q, k, v, rows, mask, scale)
    tol = KERNEL_TOL[device]
    _close(out, want, tol)
    _close(m, want_m, tol)
    _close(l, want_l, tol)
    assert out.is_contiguous()
    _close(pa.triton_partial_attention(q, k, v, rows, mask, scale), want, tol)  # the op's form: output only


def test_partial_attention_stats_are_the_log_sum_exp():
    g = _tk_gen(3)
    q, k, v = (torch.randn(s, generator=g) for s in [(2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8)])
    rows = _tk_rows(2, 5, 7, g)
    per_head = torch.rand(2, 4, 1, 7, generator=g) > 0.3  # not a kernel layout: the reference path
    per_head[..., 0] = True
    for mask in (_mask("key", 2, 7, g), per_head):
        out, m, l = ops.partial_attention_stats(q, k, v, rows, mask, None)
        s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(8)
        s = s.masked_fill(~mask, float("-inf"))
        _close(m + l.log(), torch.logsumexp(s, -1))
        _close(out, ops.partial_attention(q, k, v, rows, mask, None))
        if HAS_TRITON and INTERPRET:  # falls back to the reference for the per-head mask
            for x, y in zip(
                pa.triton_partial_attention(q, k, v, rows, mask, None, return_stats=True), (out, m, l)
            ):
                _close(x, y)


# --- approximate attention -------------------------------------------------------------------


def _approx_inputs(bsz, kv_heads, group, n_rows, n_changed, d, g, salient="changed", pad=False):
    heads = kv_heads * group
    q = torch.randn(bsz, heads, n_rows, d, generator=g)
    k = torch.randn(bsz, kv_heads, n_rows, d, generator=g)
    changed = _tk_rows(bsz, n_changed, n_rows, g)
    dv_rows = 0.1 * torch.randn(bsz, kv_heads, n_changed, d, generator=g)
    cached = torch.randn(bsz, heads, n_rows, d, generator=g)
    if pad:  # a repeat of the last row (same dV) and a -1 slot
        changed = torch.cat([changed, changed[:, -1:], torch.full((bsz, 1), -1)], 1)
        dv_rows = torch.cat([dv_rows, dv_rows[:, :, -1:], torch.randn(bsz, kv_heads, 1, d, generator=g)], 2)
    sal = changed if salient == "changed" else _tk_rows(bsz, max(1, n_rows // 3), n_rows, g)
    if salient == "none":
        sal = sal[:, :0]
    sal_ctx = torch.randn(bsz, heads, sal.shape[1], d, generator=g)
    if pad and salient == "changed":
        sal_ctx[:, :, -2] = sal_ctx[:, :, -3]  # the repeated row carries the same context
    return q, k, changed, dv_rows, cached, sal, sal_ctx


@on_kernel_devices
@SETTINGS
@given(
    n_rows=LENGTHS,
    bsz=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    frac=st.floats(0, 1),
    mask_kind=st.sampled_from([None, "key", "full"]),
    salient=st.sampled_from(["changed", "other", "none"]),
    pad=st.booleans(),
    cached_stats=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_approx_attention_matches_reference(
    device, n_rows, bsz, kv_heads, group, frac, mask_kind, salient, pad, cached_stats, seed
):
    g = _tk_gen(seed)
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
    args, mask, extra = _on(device, *args), _on(device, mask)[0], _on(device, *extra)
    got = aa.triton_approx_attention(*args, mask, None, *extra)
    want = aa.approx_attention_reference(*args, mask, None, *extra)
    for x, y in zip(got, want):
        _close(x, y, KERNEL_TOL[device])


@pytest.mark.slow
@SETTINGS
@given(
    n_rows=st.integers(3, 17),
    mask_kind=st.sampled_from([None, "key", "full"]),
    cached_stats=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_approx_attention_query_range_equals_slice_of_all_rows(n_rows, mask_kind, cached_stats, seed, data):
    """Querying only rows [q0, q1) gives exactly those rows of the all-rows call (reference and,
    where Triton imports, the kernel); so does any row set, here the span reversed with a repeat."""
    g = _tk_gen(seed)
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
    impls = [aa.approx_attention_reference] + (
        [aa.triton_approx_attention] if HAS_TRITON and INTERPRET else []
    )
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


@pytest.mark.parametrize(
    "device, half",
    [
        pytest.param(*KERNEL_DEVICES[0].values, torch.float16, marks=KERNEL_DEVICES[0].marks),
        # the interpreter's tl.dot mishandles bf16 (numpy has no bf16): bf16 on a GPU only
        *(
            pytest.param(*KERNEL_DEVICES[1].values, dtype, marks=KERNEL_DEVICES[1].marks)
            for dtype in (torch.float16, torch.bfloat16)
        ),
    ],
)
def test_triton_kernels_in_half_precision(device, half):
    """16-bit inputs (fp32 accumulation inside) against the reference on the same inputs."""
    tol = 2e-3 if device == "cpu" else HALF_TOL[half]
    g = _tk_gen(21)
    q, k, v = (torch.randn(s, generator=g).to(half) for s in [(2, 4, 3, 8), (2, 2, 7, 8), (2, 2, 7, 8)])
    q, k, v, rows, mask = _on(device, q, k, v, _tk_rows(2, 3, 7, g), _mask("key", 2, 7, g))
    out = pa.triton_partial_attention(q, k, v, rows, mask, None)
    assert out.dtype == half
    _close(out.float(), pa.partial_attention_reference(q, k, v, rows, mask, None).float(), tol)
    args = _on(
        device, *(x.to(half) if x.is_floating_point() else x for x in _approx_inputs(2, 2, 2, 7, 3, 8, g))
    )
    for x, y in zip(
        aa.triton_approx_attention(*args, mask, None), aa.approx_attention_reference(*args, mask, None)
    ):
        assert x.dtype == y.dtype
        _close(x.float(), y.float(), tol)


def _changed_step(
    seed=0, bsz=2, kv_heads=2, group=2, n_rows=13, d=8, n_changed=3, eps=0.05, mask_kind="key", k_eps=None
):
    """One denoising step where a few rows change slightly (q, K, V of those rows by ``eps``
    relative noise, K by ``k_eps`` if given): (op args, exact new context, old (K rows, m, l))."""
    k_eps = eps if k_eps is None else k_eps
    g = _tk_gen(seed)
    heads = kv_heads * group
    q = torch.randn(bsz, heads, n_rows, d, generator=g)
    k = torch.randn(bsz, kv_heads, n_rows, d, generator=g)
    v = torch.randn(bsz, kv_heads, n_rows, d, generator=g)
    mask = _mask(mask_kind, bsz, n_rows, g)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)  # noqa: E731
    cached_ctx = sdpa(q, k, v)
    changed = _tk_rows(bsz, n_changed, n_rows, g)
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


# --- registration: opcheck, export, the CUDA kernels -----------------------------------------


@OP_DEVICES
@pytest.mark.parametrize("mask_kind, scale", [(None, None), ("key", 0.3), ("full", None)])
def test_opcheck_partial_attention_stats(device, mask_kind, scale):
    g = _tk_gen(12)
    q, k, v = (torch.randn(s, generator=g) for s in [(2, 4, 3, 8), (2, 2, 7, 8), (2, 2, 7, 8)])
    args = (*_on(device, q, k, v, _tk_rows(2, 3, 7, g), _mask(mask_kind, 2, 7, g)), scale)
    torch.library.opcheck(ops.partial_attention_stats.default, args)


@OP_DEVICES
@pytest.mark.parametrize("cached_stats", [False, True])
def test_opcheck_approx_attention(device, cached_stats):
    args, _, old = _changed_step(seed=2, n_rows=7, n_changed=2)
    torch.library.opcheck(ops.approx_attention.default, _on(device, *args, *(old if cached_stats else ())))


def test_export_keeps_the_ops():
    class Step(torch.nn.Module):
        def forward(self, q, k, changed, dv_rows, cached_ctx, mask):
            salient_ctx = cached_ctx[:, :, :2]
            ctx, stats, m, l = ops.approx_attention(
                q, k, changed, dv_rows, cached_ctx, changed, salient_ctx, mask, None
            )
            return ctx, stats

    args, _, _ = _changed_step(seed=3, n_rows=7, n_changed=2)
    q, k, changed, dv_rows, cached_ctx, *_ = args
    ep = torch.export.export(Step(), (q, k, changed, dv_rows, cached_ctx, args[7]))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert ops.approx_attention.default in targets
    got = ep.module()(q, k, changed, dv_rows, cached_ctx, args[7])
    for x, y in zip(got, Step()(q, k, changed, dv_rows, cached_ctx, args[7])):
        assert torch.equal(x, y)


@pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("DYLLM_TRITON") == "0",
    reason="the CUDA (Triton) kernels register only with triton importable and without DYLLM_TRITON=0",
)
@pytest.mark.parametrize(
    "name",
    ["cache_write_rows", "partial_attention", "partial_attention_stats", "approx_attention"],
)
def test_cuda_kernels_are_registered(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dyllm::{name}", "CUDA")


# --- on a GPU: the ops reach the Triton kernels, compile whole, and hold at GPU sizes --------


def cuda_only(test):
    """Marked ``cuda``; skipped without a CUDA device or triton."""
    for mark in (pytest.mark.cuda, NO_CUDA, pytest.mark.skipif(not HAS_TRITON, reason="needs triton")):
        test = mark(test)
    return test


def _cuda_op_calls() -> dict:
    """Per op name: (op arguments, the Triton launcher the op should run), on CUDA tensors."""
    g = _tk_gen(500)
    q, k, v = _on(
        "cuda", *(torch.randn(s, generator=g) for s in [(2, 4, 3, 16), (2, 2, 13, 16), (2, 2, 13, 16)])
    )
    rows, mask = _on("cuda", _tk_rows(2, 3, 13, g), _mask("key", 2, 13, g))
    cache, values = _on("cuda", torch.randn(2, 2, 13, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g))
    approx = _on("cuda", *_approx_inputs(2, 2, 2, 13, 3, 16, g, pad=True))
    return {
        "cache_write_rows": ((cache, rows, values, 2), cs.triton_cache_write_rows),
        "partial_attention": ((q, k, v, rows, mask, None), pa.triton_partial_attention),
        "partial_attention_stats": (
            (q, k, v, rows, mask, None),
            lambda *a: pa.triton_partial_attention(*a, return_stats=True),
        ),
        "approx_attention": ((*approx, mask, None), aa.triton_approx_attention),
    }


@pytest.mark.parametrize(
    "name",
    ["cache_write_rows", "partial_attention", "partial_attention_stats", "approx_attention"],
)
@cuda_only
def test_ops_on_cuda_run_the_triton_kernels(name):
    """A dyllm:: call on CUDA tensors gives bit for bit what its Triton launcher gives."""
    args, launcher = _cuda_op_calls()[name]
    if name == "cache_write_rows":
        via_op, direct = args[0].clone(), args[0].clone()
        ops.cache_write_rows(via_op, *args[1:])
        launcher(direct, *args[1:])
        assert torch.equal(via_op, direct)
        return
    got, want = getattr(ops, name)(*args), launcher(*args)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.parametrize("fn_name", ["partial", "write_then_attend"])
@cuda_only
def test_ops_compile_whole_on_cuda(fn_name):
    """torch.compile (inductor, fullgraph: a graph break fails) of code that calls the ops,
    against eager, on two call sizes; the caches the ops write compared too."""

    def partial(q_all, k, v, rows):
        q = gather_rows(q_all, rows, 2) * 1.5
        return ops.partial_attention(q, k, v, rows, None, None) * 2 + 1

    def write_then_attend(q_all, k_cache, v_cache, k_new, v_new, rows, mask):
        ops.cache_write_rows(k_cache, rows, k_new, 2)
        ops.cache_write_rows(v_cache, rows, v_new, 2)
        return ops.partial_attention(gather_rows(q_all, rows, 2), k_cache, v_cache, rows, mask, None)

    fn = {"partial": partial, "write_then_attend": write_then_attend}[fn_name]
    compiled = torch.compile(fn, fullgraph=True)
    for call in range(2):
        g, n = _tk_gen(600 + call), 2 + call
        if fn_name == "partial":
            shapes = [(1, 4, 37, 16), (1, 2, 37, 16), (1, 2, 37, 16)]
            args = [*(torch.randn(s, generator=g) for s in shapes), _tk_rows(1, n, 37, g).sort(-1).values]
        else:
            shapes = [(2, 4, 37, 16), (2, 2, 37, 16), (2, 2, 37, 16), (2, 2, n, 16), (2, 2, n, 16)]
            args = [
                *(torch.randn(s, generator=g) for s in shapes),
                _tk_rows(2, n, 37, g),
                _mask("key", 2, 37, g),
            ]
        args = list(_on("cuda", *args))
        eager_args = [a.clone() for a in args]
        _close(compiled(*args), fn(*eager_args), 1e-4)
        for a, b in zip(args, eager_args):
            _close(a, b, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seq_len, d", [(37, 128), (130, 64), (515, 40)])
@cuda_only
def test_triton_kernels_at_gpu_sizes(seq_len, d, dtype):
    """Odd lengths and head sizes beyond what the interpreter can afford, GQA 4 with key padding,
    some rows active. The truth is the reference on fp32 inputs (16-bit inputs upcast), so a
    bf16 case measures the kernel's own rounding."""
    tol = 1e-4 if dtype == torch.float32 else HALF_TOL[dtype]
    up = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    g = _tk_gen(seq_len)
    n = max(1, seq_len // 4)
    q, k, v = (torch.randn(s, generator=g) for s in [(1, 8, n, d), (1, 2, seq_len, d), (1, 2, seq_len, d)])
    q, k, v = (t.to(dtype) for t in (q, k, v))
    q, k, v, rows, mask = _on("cuda", q, k, v, _tk_rows(1, n, seq_len, g), _mask("key", 1, seq_len, g))
    out = pa.triton_partial_attention(q, k, v, rows, mask, None)
    _close(out.float(), pa.partial_attention_reference(up(q), up(k), up(v), rows, mask, None), tol)

    cache = torch.randn(1, 2, seq_len, d, generator=g).to(dtype).cuda()
    values = torch.randn(1, 2, n, d, generator=g).to(dtype).cuda()
    want = cache.clone()
    cs.cache_write_rows_reference(want, rows, values, 2)
    cs.triton_cache_write_rows(cache, rows, values, 2)
    assert torch.equal(cache, want)

    args = _approx_inputs(1, 2, 4, seq_len, n, d, g, pad=True)
    args = _on("cuda", *(a.to(dtype) if a.is_floating_point() else a for a in args))
    got = aa.triton_approx_attention(*args, mask, None)
    want = aa.approx_attention_reference(*map(up, args), mask, None)
    for x, y in zip(got, want):
        _close(x.float(), y.float(), tol)


# ==========================================================================================
# the lean CPU paths against the references
# ==========================================================================================
TOL = dict(rtol=1e-5, atol=1e-6)


def _fast_gen(seed):
    return torch.Generator().manual_seed(seed)


def _seed(*params):
    """A seed per test case, the same in every run (``hash`` of a str is salted per process)."""
    return zlib.crc32(repr(params).encode())


def _fast_mask(kind, bsz, n, g):
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


def _fast_close(got, want):
    for x, y in zip(got, want):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.is_contiguous()
        torch.testing.assert_close(x, y, **TOL)


# --- partial_attention_stats ------------------------------------------------------------------


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (2, 1)])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("out_from_sdpa", [True, False], ids=["sdpa_out", "one_pass_out"])
def test_partial_attention_stats_fast_matches_reference(
    monkeypatch, heads, kv_heads, mask_kind, scale, out_from_sdpa
):
    monkeypatch.setattr(pa, "STATS_OUT_FROM_SDPA", out_from_sdpa)
    g = _fast_gen(_seed(heads, kv_heads, mask_kind, scale))
    bsz, n_q, n, d = 3, 5, 11, 8
    q = torch.randn(bsz, heads, n_q, d, generator=g)
    k, v = torch.randn(2, bsz, kv_heads, n, d, generator=g)
    rows = torch.stack([torch.randperm(n, generator=g)[:n_q] for _ in range(bsz)])
    rows[-1, 0] = 1  # a left-padded query row: fully masked under the full masks
    mask = _fast_mask(mask_kind, bsz, n, g)
    got = pa.partial_attention_stats_fast(q, k, v, rows, mask, scale)
    want = pa.partial_attention_stats_reference(q, k, v, rows, mask, scale)
    _fast_close(got, want)
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
    g = _fast_gen(7)
    bsz, heads, kv_heads, n_q, n, d = 3, 4, 2, 5, 11, 8
    q = torch.randn(bsz, heads, n_q, d, generator=g)
    k, v = torch.randn(2, bsz, kv_heads, n, d, generator=g)
    rows = torch.stack([torch.randperm(n, generator=g)[:n_q] for _ in range(bsz)])
    mask = _fast_mask("full", bsz, n, g)
    got = pa.partial_attention_stats_fast(q, k, v, rows, mask, None)
    assert torch.equal(got[0], pa.partial_attention_reference(q, k, v, rows, mask, None))
    _fast_close(got, pa.partial_attention_stats_reference(q, k, v, rows, mask, None))


@pytest.mark.parametrize("out_from_sdpa", [True, False], ids=["sdpa_out", "one_pass_out"])
def test_partial_attention_stats_fast_other_inputs(monkeypatch, out_from_sdpa):
    """Non-contiguous q, other mask layouts (these go to the reference), 16-bit inputs (their
    output is SDPA's in both settings)."""
    monkeypatch.setattr(pa, "STATS_OUT_FROM_SDPA", out_from_sdpa)
    g = _fast_gen(5)
    bsz, heads, kv_heads, n_q, n, d = 2, 4, 2, 3, 9, 8
    q = torch.randn(bsz, n_q, heads, d, generator=g).transpose(1, 2)
    k, v = torch.randn(2, bsz, kv_heads, n, d, generator=g)
    rows = torch.stack([torch.randperm(n, generator=g)[:n_q] for _ in range(bsz)])
    _fast_close(
        pa.partial_attention_stats_fast(q, k, v, rows, None, None),
        pa.partial_attention_stats_reference(q, k, v, rows, None, None),
    )
    per_head = torch.rand(bsz, heads, 1, n, generator=g) > 0.3
    per_head[..., 0] = True
    _fast_close(
        pa.partial_attention_stats_fast(q, k, v, rows, per_head, None),
        pa.partial_attention_stats_reference(q, k, v, rows, per_head, None),
    )
    half = [x.half() for x in (q, k, v)]
    got = pa.partial_attention_stats_fast(*half, rows, _fast_mask("key", bsz, n, g), None)
    want = pa.partial_attention_stats_reference(*half, rows, _fast_mask("key", bsz, n, g), None)
    assert got[0].dtype == torch.float16 and got[1].dtype == got[2].dtype == torch.float32
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1:], want[1:], **TOL)  # the stats are fp32 from fp16 inputs in both


# --- approx_attention -------------------------------------------------------------------------


def _fast_approx_inputs(g, bsz, heads, kv_heads, n, q_start, n_q, d, salient):
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
    g = _fast_gen(_seed(heads, kv_heads, mask_kind, cached_stats, span, salient))
    q, k, changed, dv_rows, cached, sal, sal_ctx, k_old = _fast_approx_inputs(
        g, bsz, heads, kv_heads, n, q_start, n_q, d, salient
    )
    mask = _fast_mask(mask_kind, bsz, n, g)
    q_rows = _span(q_start, n_q, bsz)
    extra = (k_old, *_old_stats(q, k, mask, q_rows, g)) if cached_stats else ()
    args = (q, k, changed, dv_rows, cached, sal, sal_ctx, mask, None, *extra)
    got = aa.approx_attention_fast(*args, q_rows=q_rows)
    want = aa.approx_attention_reference(*args, q_rows=q_rows)
    _fast_close(got, want)
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
    g = _fast_gen(21)
    bsz, heads, kv_heads, n, d = 2, 4, 2, 11, 8
    q, k, changed, dv_rows, cached, sal, sal_ctx, _ = _fast_approx_inputs(
        g, bsz, heads, kv_heads, n, 0, n, d, "changed"
    )
    mask = _fast_mask(mask_kind, bsz, n, g)
    full = aa.approx_attention_reference(q, k, changed, dv_rows, cached, sal, sal_ctx, mask, None)
    pick = torch.stack(
        [torch.cat([torch.randperm(n, generator=g)[:6], torch.tensor([3])]) for _ in range(bsz)]
    )
    pick[:, -1] = pick[:, 0]  # a repeat
    q_sub, cached_sub = (t.gather(2, pick[:, None, :, None].expand(-1, heads, -1, d)) for t in (q, cached))
    for fn in (aa.approx_attention_reference, aa.approx_attention_fast):
        got = fn(q_sub, k, changed, dv_rows, cached_sub, sal, sal_ctx, mask, None, q_rows=pick)
        idx = pick[:, None, :, None].expand(-1, heads, -1, d)
        torch.testing.assert_close(got[0], full[0].gather(2, idx), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            got[1], full[1].gather(1, pick[..., None].expand(-1, -1, 3)), rtol=1e-5, atol=1e-5
        )


def test_approx_attention_fast_scale_and_edge_cases():
    g = _fast_gen(11)
    bsz, heads, kv_heads, n, d = 2, 4, 1, 9, 8
    q, k, changed, dv_rows, cached, sal, sal_ctx, k_old = _fast_approx_inputs(
        g, bsz, heads, kv_heads, n, 2, 6, d, "other"
    )
    mask = _fast_mask("key", bsz, n, g)
    q_rows = _span(2, 6, bsz)
    m_old, l_old = _old_stats(q, k, mask, q_rows, g)
    for extra in [(), (k_old, m_old, l_old)]:
        args = (q, k, changed, dv_rows, cached, sal, sal_ctx, mask, 0.7, *extra)
        _fast_close(
            aa.approx_attention_fast(*args, q_rows=q_rows),
            aa.approx_attention_reference(*args, q_rows=q_rows),
        )
    # sorted vs shuffled changed lists give the same result (the repeat test is order free)
    order = changed.argsort(1)
    idx = order[:, None, :, None].expand(-1, kv_heads, -1, d)  # keeps dV / k_old aligned with the slots
    args_sorted = (
        q,
        k,
        changed.gather(1, order),
        dv_rows.gather(2, idx),
        cached,
        sal,
        sal_ctx,
        mask,
        None,
        k_old.gather(2, idx),
        m_old,
        l_old,
    )
    _fast_close(
        aa.approx_attention_fast(*args_sorted, q_rows=q_rows),
        aa.approx_attention_reference(*args_sorted, q_rows=q_rows),
    )
    # no changed row at all (mode 1): the context stays the cached one, the stats are exact
    none = changed[:, :0]
    args = (q, k, none, dv_rows[:, :, :0], cached, sal, sal_ctx, mask, None)
    got = aa.approx_attention_fast(*args, q_rows=q_rows)
    _fast_close(got, aa.approx_attention_reference(*args, q_rows=q_rows))
    # ... and in mode 2 (where the reference's max over no column raises): m, l stay the old ones
    got = aa.approx_attention_fast(*args, k_old[:, :, :0], m_old, l_old, q_rows=q_rows)
    torch.testing.assert_close(got[2], m_old)
    torch.testing.assert_close(got[3], l_old)
    # every changed entry dropped (-1): cached context, the old stats
    drop = torch.full_like(changed, -1)
    args = (q, k, drop, dv_rows, cached, sal, sal_ctx, mask, None, k_old, m_old, l_old)
    _fast_close(
        aa.approx_attention_fast(*args, q_rows=q_rows), aa.approx_attention_reference(*args, q_rows=q_rows)
    )
    # 16-bit inputs: ctx in cached's dtype, fp32 stats
    half = [x.half() for x in (q, k, dv_rows, cached, sal_ctx)]
    args = (half[0], half[1], changed, half[2], half[3], sal, half[4], mask, None)
    got, want = (
        aa.approx_attention_fast(*args, q_rows=q_rows),
        aa.approx_attention_reference(*args, q_rows=q_rows),
    )
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got[1:], want[1:], rtol=1e-4, atol=1e-4)


def test_approx_attention_fast_rejects_what_the_reference_rejects():
    g = _fast_gen(3)
    q, k, changed, dv_rows, cached, sal, sal_ctx, k_old = _fast_approx_inputs(g, 2, 2, 2, 7, 0, 7, 4, "none")
    per_head = torch.ones(2, 2, 1, 7, dtype=torch.bool)
    # the Triton launcher too (it has no fallback: the reference rejects these masks as well)
    triton = [aa.triton_approx_attention] if HAS_TRITON and INTERPRET else []
    for fn in (aa.approx_attention_fast, aa.approx_attention_reference, *triton):
        with pytest.raises(NotImplementedError):
            fn(q, k, changed, dv_rows, cached, sal, sal_ctx, per_head, None)
        with pytest.raises(ValueError):  # q_rows must be (B, Nq)
            fn(q, k, changed, dv_rows, cached, sal, sal_ctx, None, None, q_rows=_span(1, 6, 2))


_VIEWS = {
    "view",
    "_unsafe_view",
    "unsqueeze",
    "squeeze",
    "expand",
    "select",
    "slice",
    "narrow",
    "transpose",
    "t",
    "permute",
    "as_strided",
    "alias",
    "_reshape_alias",
    "scalar_tensor",
}


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
    g = _fast_gen(4)
    bsz, heads, n, d = 4, 4, 24, 8
    inputs = _fast_approx_inputs(g, bsz, heads, kv_heads, n, 5, 16, d, "changed")
    q, k, changed, dv_rows, cached, sal, sal_ctx, k_old = inputs
    mask = _fast_mask("key", bsz, n, g)
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
