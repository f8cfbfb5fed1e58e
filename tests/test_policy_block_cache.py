"""Fast-dLLM prefix / dual cache: which rows each step recomputes, and what generation gives."""

import pytest
import torch

import dyllm_fx
from dyllm_fx.runtime.policies import DualCachePolicy, HostState, PrefixCachePolicy
from dyllm_fx.runtime.policies.uniform import plan_rows
from tiny_checkpoints import tiny_llada, tiny_tokenizer


def _host(block, cold=False, seq=24):
    ids = torch.zeros(2, seq, dtype=torch.long)
    return HostState(ids, torch.ones_like(ids), cold, 2, block_start=block[0], block_end=block[1])


@pytest.mark.parametrize("policy, span", [(PrefixCachePolicy, (8, 24)), (DualCachePolicy, (8, 16))])
def test_refresh_at_block_start_then_only_the_span(policy, span):
    p = policy()
    assert p.plan(_host((8, 16))).kind == "full"  # first step of a block: everything
    plan = p.plan(_host((8, 16)))
    rows = plan_rows(plan, 2, 24, "cpu")
    assert plan.kind == "span" and plan.note["active"] == span[1] - span[0]
    assert rows.shape == (2, span[1] - span[0]) and rows[0].tolist() == list(range(*span))
    assert p.plan(_host((16, 24))).kind == "full"  # new block: refresh again
    assert p.plan(_host((16, 24), cold=True)).kind == "full"  # a cold cache always refreshes
    assert p.plan(_host((16, 24))).kind == "span"  # and the cold step was the block's refresh


def test_needs_block_bounds():
    with pytest.raises(ValueError, match="block bounds"):
        DualCachePolicy().plan(_host((None, None)))


@pytest.mark.parametrize("name", ["prefix_cache", "dual_cache"])
def test_generation_recomputes_only_the_span(name):
    torch.manual_seed(0)
    model, tok = tiny_llada(seed=0), tiny_tokenizer()
    fast = dyllm_fx.transform(model, policy=name)
    out = dyllm_fx.generate(
        fast, tok, ["rev:abcdef="], gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False
    )
    records = fast.engine.records
    assert len(records) == out.stats.nfe == 16
    seq = out.sequences.shape[1]
    span = {"prefix_cache": [16, 8], "dual_cache": [8, 8]}[name]  # block + suffix, or block only
    for step, rec in enumerate(records):
        first_of_block = step % 8 == 0
        expected = seq if first_of_block else span[step // 8]
        assert rec.active == [expected] * len(rec.active), (step, rec.active)
    assert (out.responses != model.diffusion.mask_token_id).all()
