"""The sparse-step engine's own mechanics: row buckets and cache lifetime."""

import torch
from tiny_checkpoints import tiny_llada, tiny_tokenizer

import dyllm_fx
from dyllm_fx.runtime.policies import Policy
from dyllm_fx.runtime.sparse_step import bucket_size, pad_rows


def test_bucket_sizes_are_powers_of_two_capped_at_the_sequence():
    assert [bucket_size(n, 100) for n in (1, 8, 9, 33, 64, 65, 100)] == [8, 8, 16, 64, 64, 100, 100]


def test_pad_rows_repeats_the_last_index_per_row():
    rows = torch.tensor([[1, 4, 6], [0, 2, 9]])
    padded = pad_rows(rows, seq_len=40)
    assert padded.shape == (2, 8)
    assert padded[0].tolist() == [1, 4, 6] + [6] * 5 and padded[1].tolist() == [0, 2, 9] + [9] * 5
    assert pad_rows(torch.arange(8)[None], seq_len=8).shape == (1, 8)


def test_cache_from_generate_is_usable_outside_inference_mode():
    model, tok = tiny_llada(seed=0), tiny_tokenizer()
    fast = dyllm_fx.transform(model)
    out = dyllm_fx.generate(fast, tok, ["rev:abc="], gen_length=8, block_length=4, progress=False)
    with torch.no_grad():  # same shape: the engine reuses the cache generate() allocated
        logits = fast(out.sequences.clone())
        assert torch.allclose(logits, model(out.sequences), atol=1e-5)


class _HalfMLP(Policy):
    """Every row active, but only the even positions of each layer's rows get a fresh MLP."""

    name = "half_mlp"
    needs_mlp_cache = True

    def __init__(self):
        self.subsets = 0

    def after_attention(self, layer, rows, context):
        if self.state.cold:
            return None
        self.subsets += 1
        return torch.arange(0, rows.shape[1], 2, device=rows.device).expand(rows.shape[0], -1)


def test_mlp_subset_reuses_cached_mlp_output():
    model = tiny_llada(seed=1)
    policy = _HalfMLP()
    fast = dyllm_fx.transform(model, policy=policy)
    ids = torch.randint(3, 40, (2, 11))
    with torch.no_grad():
        cold = fast(ids)  # fills the MLP cache
        warm = fast(ids)  # same tokens: cached MLP outputs equal fresh ones
        assert policy.subsets == model.config.n_layers
        torch.testing.assert_close(warm, cold, rtol=0, atol=1e-6)
        torch.testing.assert_close(warm, model(ids), rtol=0, atol=1e-5)
        # a stale MLP cache must show: zero it, and the odd rows' outputs change
        for buf in fast.engine.mlp_cache:
            buf.zero_()
        assert not torch.allclose(fast(ids), cold, atol=1e-3)


def test_pad_row_set_fills_holes_with_a_row_of_the_same_element():
    from dyllm_fx.runtime.rows import pad_row_set

    rows = torch.tensor([[3, 7, -1], [-1, -1, -1], [5, -1, 2]])
    padded = pad_row_set(rows, fill=11, seq_len=40)
    assert padded.shape == (3, 8)
    assert padded[0].tolist() == [3, 7] + [7] * 6
    assert padded[1].tolist() == [11] * 8  # no row at all: the fill row
    assert padded[2].tolist() == [5, 5, 2] + [2] * 5
    assert pad_row_set(rows[:, :0], fill=4, seq_len=40).tolist() == [[4] * 8] * 3  # an empty set


def test_rows_where_lists_the_flagged_positions():
    from dyllm_fx.runtime.rows import rows_where

    flag = torch.tensor([[False, True, True, False], [False, False, False, True]])
    assert rows_where(flag, offset=10).tolist() == [[11, 12], [13, -1]]
    assert rows_where(flag & False, offset=10).shape == (2, 0)


def test_flat_row_set_lists_valid_entries_in_batch_order_padded_to_a_bucket():
    from dyllm_fx.runtime.rows import flat_row_set

    rows = torch.tensor([[3, 7, -1], [-1, -1, -1], [5, -1, 2]])
    batch, pos = flat_row_set(rows, max_rows=120)
    assert batch.tolist() == [0, 0, 2, 2] + [2] * 4
    assert pos.tolist() == [3, 7, 5, 2] + [2] * 4
    batch, pos = flat_row_set(rows.new_full((2, 3), -1), max_rows=120)
    assert batch.numel() == pos.numel() == 0
    assert flat_row_set(rows, max_rows=6)[0].numel() == 6  # the bucket is capped


def test_row_wise_mlp_writes_each_salient_row_once_and_nothing_else():
    from dyllm_fx.runtime.approx_layer import _row_wise_mlp

    calls = []

    def mlp(x, rows):
        calls.append(tuple(x.shape))
        return 2 * x

    h_mid = torch.randn(2, 5, 3)  # query rows [10, 15)
    cache = torch.zeros(2, 16, 3)
    _row_wise_mlp(mlp, h_mid, torch.tensor([[11, 14], [12, -1]]), 10, cache)
    assert calls == [(1, 8, 3)]  # one flat call: 3 rows padded to the smallest bucket
    expect = torch.zeros(2, 16, 3)
    expect[0, 11], expect[0, 14], expect[1, 12] = 2 * h_mid[0, 1], 2 * h_mid[0, 4], 2 * h_mid[1, 2]
    torch.testing.assert_close(cache, expect)
