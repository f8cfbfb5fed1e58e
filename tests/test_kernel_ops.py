"""The dyllm:: custom ops (kernels/dispatch.py): registration checks and reference semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dyllm_fx.kernels.dispatch import gather_rows

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
    full = F.scaled_dot_product_attention(q_all, k, v, attn_mask=mask, scale=0.3, enable_gqa=kv_heads != heads)
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
    for a, b in zip(dispatch.approx_attention(*args, q_rows=q_rows), ops.approx_attention(*args, q_rows=q_rows)):
        torch.testing.assert_close(a, b)
    c1, c2 = torch.zeros(bsz, kv_heads, seq_len, d), torch.zeros(bsz, kv_heads, seq_len, d)
    dispatch.cache_write_rows(c1, rows, v[:, :, :3], 2)
    ops.cache_write_rows(c2, rows, v[:, :, :3], 2)
    torch.testing.assert_close(c1, c2)
    assert dispatch.approx_attention.op._qualname == "dyllm::approx_attention"  # CUDA tensors take the registered op


def test_one_table_names_every_registered_op():
    from dyllm_fx.kernels.dispatch import KERNELS, REGISTERED

    assert set(KERNELS) == set(REGISTERED) == {
        "cache_write_rows", "partial_attention", "partial_attention_stats", "saliency", "approx_attention"
    }
