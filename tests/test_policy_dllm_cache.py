"""dLLM-Cache (runtime/policies/dllm_cache.py): refresh cadence, the adaptive rows, and the
keep-everything limit."""

import pytest
import torch

import dyllm_fx
from dyllm_fx.runtime.policies import DLLMCachePolicy, HostState
from dyllm_fx.runtime.policies.dllm_cache import AdaptiveKey, ResponseKey, value_similarity
from tiny_checkpoints import tiny_llada, tiny_tokenizer


def _host(step, cold=False):
    ids = torch.zeros(1, 12, dtype=torch.long)
    return HostState(
        ids, torch.ones_like(ids), cold, 2, step=step, block_start=4, block_end=8, response_start=4
    )


def test_cadence_prompt_and_response_intervals():
    policy = DLLMCachePolicy(prompt_interval=6, response_interval=3, ratio=0.5)
    plans = [policy.plan(_host(step, cold=step == 0)) for step in range(8)]
    assert [p.kind for p in plans] == [
        "full",
        "adaptive",
        "adaptive",
        "response",
        "adaptive",
        "adaptive",
        "full",
        "adaptive",
    ]
    # ceil(0.5 * 8) rows
    assert plans[1].key == AdaptiveKey(8, 4) and plans[3].key == ResponseKey(8)


def test_value_similarity_is_the_cosine_over_heads():
    v = torch.randn(2, 3, 5, 4)
    assert torch.allclose(value_similarity(v, v), torch.ones(2, 5))
    assert torch.allclose(value_similarity(v, -v), -torch.ones(2, 5))


def test_unchanged_rows_tie_at_exactly_one():
    """Rounding noise of an unchanged row's cosine (1 +- a few ulp) is 1 exactly, so the
    stable top-k picks among unchanged rows by position in every implementation (the exported
    ONNX step computes the cosine in another order)."""
    v = torch.randn(1, 2, 6, 16, dtype=torch.float64).float()
    noisy = v * (1 + 1e-7 * torch.randn_like(v))
    sim = value_similarity(noisy, v)
    assert torch.equal(sim, torch.ones(1, 6))
    moved = v.clone()
    moved[:, :, 2] += 0.1
    assert value_similarity(moved, v)[0, 2] < 1.0


def test_adaptive_steps_refresh_the_rows_whose_values_moved_most():
    model, tok = tiny_llada(seed=5, n_layers=2), tiny_tokenizer()
    tm = dyllm_fx.transform(
        model, policy="dllm_cache", ratio=0.25, response_interval=100, prompt_interval=100
    )
    tm.engine.record_activity = True
    out = dyllm_fx.generate(
        tm, tok, ["rev:abc="], gen_length=16, block_length=8, steps=16, progress=False, stop_at_eos=False
    )
    plen = out.prompt_length
    for record in tm.engine.records[1:]:
        assert record.kind == "adaptive" and record.active == [4, 4]
        per_layer = record.activity[:, 0]
        assert (per_layer[:, plen:] == 1).sum(1).tolist() == [4, 4] and per_layer[:, :plen].max() == 0


def test_ratio_one_over_everything_equals_vanilla():
    model, tok = tiny_llada(seed=6, n_layers=3), tiny_tokenizer()
    kw = dict(gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)
    want = dyllm_fx.generate(model, tok, ["rev:abc=", "kv:a1?a="], **kw)
    got = dyllm_fx.generate(
        dyllm_fx.transform(model, policy="dllm_cache", ratio=1.0, scope="all"),
        tok,
        ["rev:abc=", "kv:a1?a="],
        **kw,
    )
    assert torch.equal(got.sequences, want.sequences)


@pytest.mark.parametrize("ratio, error", [(0.0, ValueError), (1.5, ValueError), (True, TypeError)])
def test_bad_ratio(ratio, error):
    with pytest.raises(error, match="ratio"):
        DLLMCachePolicy(ratio=ratio)
