"""The sparse-step engine's own mechanics: row buckets and cache lifetime."""

import torch
from tiny_checkpoints import tiny_llada, tiny_tokenizer

import dyllm_fx
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
