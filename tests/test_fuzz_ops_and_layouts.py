"""Fuzzing with hypothesis: the ops and the model layouts.

* Every ``torch.ops.dyllm.*`` op against an independent plain-torch formula written here (not
  the module's own ``*_reference``, which test_kernels.py compares the Triton kernels
  with), over random shapes, grouped-query heads and row sets from empty to every row.
* The passes: randomly configured tiny LLaDA and Dream models (layers, heads, KV heads, head
  and MLP sizes, biases, tied embeddings) give the original model's logits once transformed
  with the dense policy, on a left-padded batch.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dyllm_fx
from dyllm_fx.kernels.dispatch import gather_rows
from dyllm_fx.models.layers import default_position_ids
from tiny_checkpoints import randomize_, tiny_dream_config, tiny_llada_config, tiny_tokenizer

ops = torch.ops.dyllm
OPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PASSES = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VOCAB = len(tiny_tokenizer())


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _row_sets(bsz, n, seq_len, g):
    """(B, n) distinct positions per batch element (n may be 0 or seq_len), unsorted."""
    return torch.stack([torch.randperm(seq_len, generator=g)[:n] for _ in range(bsz)]).reshape(bsz, n)


def _mask(kind, bsz, seq_len, g):
    if kind == "key":  # left padding of a different length per batch element, never every key
        mask = torch.ones(bsz, 1, 1, seq_len, dtype=torch.bool)
        for b in range(bsz):
            mask[b, ..., : (b * 2) % seq_len] = False
        return mask
    if kind == "full":
        mask = torch.rand(bsz, 1, seq_len, seq_len, generator=g) > 0.4
        mask[..., 0] = True  # no fully masked query row
        return mask
    return None


def _attention(q, k, v, mask, scale):
    """Softmax attention written out: q (B, H, A, d) against k/v (B, KV, L, d), H = KV * g."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q.double() @ k.double().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


def _query_mask(mask, rows):
    """The key mask of the query rows ``rows`` (B, A): a key mask as is, a full mask gathered."""
    if mask is None or mask.shape[2] == 1:
        return mask
    idx = rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3])
    return mask.gather(2, idx)


SHAPES = dict(
    bsz=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3]),
    seq_len=st.integers(1, 11),
    d=st.sampled_from([2, 4, 8]),
    seed=st.integers(0, 2**16),
)


@OPS
@given(
    **SHAPES,
    frac=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    mask_kind=st.sampled_from([None, "key", "full"]),
    scale=st.sampled_from([None, 0.2]),
)
def test_partial_attention_is_attention_of_the_rows(
    bsz, kv_heads, group, seq_len, d, seed, frac, mask_kind, scale
):
    g = _gen(seed)
    n = round(frac * seq_len)  # 0 rows (empty set) .. every row
    rows = _row_sets(bsz, n, seq_len, g)
    q = torch.randn(bsz, kv_heads * group, n, d, generator=g)
    k, v = torch.randn(2, bsz, kv_heads, seq_len, d, generator=g)
    mask = _mask(mask_kind, bsz, seq_len, g)
    want, lse = _attention(q, k, v, _query_mask(mask, rows), scale)
    got = ops.partial_attention(q, k, v, rows, mask, scale)
    assert got.shape == (bsz, kv_heads * group, n, d) and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    out, m, l = ops.partial_attention_stats(q, k, v, rows, mask, scale)
    # the stats op's CPU path is its own one-pass attention (kernels/partial_attention.py), equal
    # to SDPA's output up to float rounding
    torch.testing.assert_close(out, got, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((m + l.log()).double(), lse, rtol=1e-5, atol=1e-5)


@OPS
@given(
    bsz=st.integers(1, 2),
    seq_len=st.integers(1, 9),
    width=st.integers(1, 6),
    heads=st.integers(0, 2),
    frac=st.sampled_from([0.0, 0.5, 1.0]),
    repeats=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_cache_write_rows_is_an_indexed_assignment(bsz, seq_len, width, heads, frac, repeats, seed):
    g = _gen(seed)
    n = round(frac * seq_len)
    rows = _row_sets(bsz, n, seq_len, g)
    dim = 1 if heads == 0 else 2  # (B, L, D) hidden states or (B, KV, L, d) K/V
    shape = (bsz, seq_len, width) if dim == 1 else (bsz, heads, seq_len, width)
    cache = torch.randn(shape, generator=g)
    values = torch.randn(*shape[:dim], n, *shape[dim + 1 :], generator=g)
    if n and repeats:  # bucket padding: the last row repeated with identical values
        rows = torch.cat([rows, rows[:, -1:].expand(-1, repeats)], 1)
        values = torch.cat(
            [values, values.narrow(dim, n - 1, 1).expand(*[-1] * dim, repeats, *shape[dim + 1 :])], dim
        )
    want = cache.clone()
    for b in range(bsz):
        for a, r in enumerate(rows[b].tolist()):
            want[b].select(dim - 1, r).copy_(values[b].select(dim - 1, a))
    ops.cache_write_rows(cache, rows, values, dim)
    assert torch.equal(cache, want)
    assert torch.equal(gather_rows(cache, rows, dim), values)


@OPS
@given(
    **SHAPES,
    n_changed=st.integers(0, 11),
    n_salient=st.integers(0, 11),
    mask_kind=st.sampled_from([None, "key", "full"]),
    pad=st.booleans(),
)
def test_approx_attention_is_cached_context_plus_weighted_value_change(
    bsz, kv_heads, group, seq_len, d, seed, n_changed, n_salient, mask_kind, pad
):
    g = _gen(seed)
    heads = kv_heads * group
    n_changed, n_salient = min(n_changed, seq_len), min(n_salient, seq_len)
    q = torch.randn(bsz, heads, seq_len, d, generator=g)
    k = torch.randn(bsz, kv_heads, seq_len, d, generator=g)
    changed = _row_sets(bsz, n_changed, seq_len, g)
    dv_rows = torch.randn(bsz, kv_heads, n_changed, d, generator=g)
    if pad:  # a repeated changed row (same dV, counted once) and a -1 hole (ignored)
        keep = changed[:, -1:] if n_changed else torch.full((bsz, 1), -1)
        dv_keep = dv_rows[:, :, -1:] if n_changed else torch.randn(bsz, kv_heads, 1, d, generator=g)
        changed = torch.cat([changed, keep, torch.full((bsz, 1), -1)], 1)
        dv_rows = torch.cat([dv_rows, dv_keep, torch.randn(bsz, kv_heads, 1, d, generator=g)], 2)
    cached = torch.randn(bsz, heads, seq_len, d, generator=g)
    salient = _row_sets(bsz, n_salient, seq_len, g)
    salient_ctx = torch.randn(bsz, heads, n_salient, d, generator=g)
    mask = _mask(mask_kind, bsz, seq_len, g)

    ctx, stats, m, l = ops.approx_attention(q, k, changed, dv_rows, cached, salient, salient_ctx, mask, None)

    # dV as a dense (B, KV, L, d) tensor, zero off the changed rows; then P . dV with the exact P.
    dv_full = torch.zeros(bsz, kv_heads, seq_len, d, dtype=torch.float64)
    for b in range(bsz):
        for a, r in enumerate(changed[b].tolist()):
            if r >= 0:
                dv_full[b, :, r] = dv_rows[b, :, a].double()
    s = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) / math.sqrt(d)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    want = cached.double() + torch.softmax(s, -1) @ dv_full.repeat_interleave(group, 1)
    for b in range(bsz):
        want[b][:, salient[b]] = salient_ctx[b].double()
    torch.testing.assert_close(ctx.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((m + l.log()).double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
    new, old = ctx.double().transpose(1, 2).flatten(2), cached.double().transpose(1, 2).flatten(2)
    want_stats = torch.stack([(new * old).sum(-1), (new * new).sum(-1), (old * old).sum(-1)], -1)
    torch.testing.assert_close(stats.double(), want_stats, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the passes on random models


def _check_dense_transform(model, seed):
    g = _gen(seed)
    bsz, seq_len = 3, 11
    ids = torch.randint(3, VOCAB, (bsz, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0
    ids[mask == 0] = 0
    pos = default_position_ids(ids, mask)
    fast = dyllm_fx.transform(model)
    assert len(fast.program.attn) == len(model.layers)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=pos)
        got = fast(ids, mask, pos)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    return fast


LAYOUT = dict(
    n_layers=st.integers(1, 3),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([2, 4, 8]),
    mlp=st.integers(4, 40),
    tied=st.booleans(),
    seed=st.integers(0, 2**16),
)


@pytest.mark.slow
@PASSES
@given(**LAYOUT, qkv_bias=st.booleans())
def test_random_llada_layouts_transform_to_the_same_logits(
    n_layers, kv_heads, group, head_dim, mlp, tied, seed, qkv_bias
):
    heads = kv_heads * group
    cfg = tiny_llada_config(
        VOCAB,
        d_model=heads * head_dim,
        n_heads=heads,
        n_kv_heads=kv_heads,
        n_layers=n_layers,
        mlp_hidden_size=mlp,
        weight_tying=tied,
        include_qkv_bias=qkv_bias,
    )
    model = randomize_(dyllm_fx.models.LLaDAModelLM(cfg), seed)
    _check_dense_transform(model, seed)


@pytest.mark.slow
@PASSES
@given(**LAYOUT)
def test_random_dream_layouts_transform_to_the_same_logits(
    n_layers, kv_heads, group, head_dim, mlp, tied, seed
):
    heads = kv_heads * group
    cfg = tiny_dream_config(
        VOCAB,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=n_layers,
        intermediate_size=mlp,
        tie_word_embeddings=tied,
    )
    model = randomize_(dyllm_fx.models.DreamModel(cfg), seed)
    fast = _check_dense_transform(model, seed)
    # the cache keeps KV heads only (grouped-query attention is not expanded)
    with torch.no_grad():
        fast(torch.randint(3, VOCAB, (1, 5)))
    assert fast.cache.k[0].shape == (1, kv_heads, 5, head_dim)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_single_head_single_layer_model(arch):
    """The smallest layout the strategies above can draw, pinned so it always runs."""
    if arch == "llada":
        cfg = tiny_llada_config(VOCAB, d_model=4, n_heads=1, n_kv_heads=1, n_layers=1, mlp_hidden_size=4)
        model = randomize_(dyllm_fx.models.LLaDAModelLM(cfg), 1)
    else:
        cfg = tiny_dream_config(
            VOCAB,
            hidden_size=4,
            num_attention_heads=1,
            num_key_value_heads=1,
            num_hidden_layers=1,
            intermediate_size=4,
        )
        model = randomize_(dyllm_fx.models.DreamModel(cfg), 1)
    _check_dense_transform(model, 1)
