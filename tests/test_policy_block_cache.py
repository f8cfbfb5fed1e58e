"""Fast-dLLM prefix / dual cache: which rows each step recomputes, and what generation gives."""

import pytest
import torch
from tiny_checkpoints import tiny_llada, tiny_tokenizer

import dyllm_fx
from dyllm_fx.runtime.policies import DualCachePolicy, PrefixCachePolicy, StepState


def _state(block, cold=False, seq=24):
    return StepState(torch.zeros(2, seq, dtype=torch.long), None, 0, block[0], block[1], cold)


@pytest.mark.parametrize("policy, span", [(PrefixCachePolicy, (8, 24)), (DualCachePolicy, (8, 16))])
def test_refresh_at_block_start_then_only_the_span(policy, span):
    p = policy()
    p.begin_step(_state((8, 16)))
    assert p.rows(0, p.state) is None  # first step of a block: everything
    p.begin_step(_state((8, 16)))
    rows = p.rows(3, p.state)
    assert rows.shape == (2, span[1] - span[0]) and rows[0].tolist() == list(range(*span))
    p.begin_step(_state((16, 24)))
    assert p.rows(0, p.state) is None  # new block: refresh again
    p.begin_step(_state((16, 24), cold=True))
    assert p.rows(0, p.state) is None  # a cold cache always refreshes


def test_needs_block_bounds():
    with pytest.raises(ValueError, match="block bounds"):
        DualCachePolicy().begin_step(StepState(torch.zeros(1, 4, dtype=torch.long), None, 0, None, None, False))


@pytest.mark.parametrize("name", ["prefix_cache", "dual_cache"])
def test_generation_recomputes_only_the_span(name):
    torch.manual_seed(0)
    model, tok = tiny_llada(seed=0), tiny_tokenizer()
    fast = dyllm_fx.transform(model, policy=name)
    out = dyllm_fx.generate(fast, tok, ["rev:abcdef="], gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)
    records = fast.engine.records
    assert len(records) == out.stats.nfe == 16
    seq = out.sequences.shape[1]
    span = {"prefix_cache": [16, 8], "dual_cache": [8, 8]}[name]  # block + suffix, or block only
    for step, rec in enumerate(records):
        first_of_block = step % 8 == 0
        expected = seq if first_of_block else span[step // 8]
        assert rec.active == [expected] * len(rec.active), (step, rec.active)
    assert (out.responses != model.diffusion.mask_token_id).all()
