"""Block caches composed with row policies, and the methods on the trained embedded model."""

import math

import pytest
import torch

import dyllm_fx
from dyllm_fx.runtime.policies import DyLLMPolicy, make_policy


def test_composition_gives_the_row_policy_the_block_scope():
    policy = make_policy(["dual_cache", "dyllm"], tau=0.95)
    assert isinstance(policy, DyLLMPolicy) and policy.scope == "block" and policy.name == "dual_cache+dyllm"
    assert make_policy("prefix_cache+es_dllm").scope == "suffix"
    assert make_policy("dual_cache+es_dllm").scope == make_policy("es_dllm").scope == "block"  # ES-dLLM's own window


@pytest.mark.parametrize("names, match", [
    (["dual_cache", "prefix_cache"], "cannot compose"), (["dyllm", "es_dllm"], "cannot compose"),
    (["dual_cache", "dense"], "cannot compose"), (["dual_cache", "nope"], "cannot compose"),
])
def test_invalid_compositions_are_rejected(names, match):
    with pytest.raises(ValueError, match=match):
        make_policy(names)


def test_scope_with_a_block_cache_is_rejected():
    with pytest.raises(ValueError, match="scope"):
        make_policy("dual_cache+dyllm", scope="all")


@pytest.fixture(scope="module")
def trained():
    """The embedded trained model: agreement with vanilla means something only on a model
    whose predictions are not noise."""
    from dyllm_fx.eval.synthetic_tasks import held_out_set

    model, tok = dyllm_fx.load("default")
    prompts = [e.prompt for e in held_out_set(2, ("shift",), seed=0)]
    ref = dyllm_fx.generate(model, tok, prompts, gen_length=32, block_length=16, steps=32, progress=False)
    return model, tok, prompts, ref


@pytest.mark.parametrize("name, cfg", [
    ("dyllm", {}), ("dyllm", {"cached_softmax_stats": True}), ("es_dllm", {}), ("es_dllm", {"variation": "query"}),
    ("es_dllm", {"variation": "key"}), ("es_dllm", {"variation": "value"}), ("dllm_cache", {}),
    ("dual_cache+dyllm", {}), ("prefix_cache+es_dllm", {}),
])
def test_sparse_methods_run_sparse_and_stay_close(trained, name, cfg):
    model, tok, prompts, ref = trained
    tm = dyllm_fx.transform(model, policy=name, **cfg)
    tm.engine.record_similarity = True
    out = dyllm_fx.generate(tm, tok, prompts, gen_length=32, block_length=16, steps=32, progress=False)
    active = [r.active_fraction for r in tm.engine.records]
    assert active[0] == 1.0 and min(active) < 0.6
    assert (out.responses == ref.responses).float().mean() > 0.9
    if name.endswith("dyllm"):
        sims = [s for r in tm.engine.records for s in r.similarity if s is not None]
        assert sims and all(s.shape == out.sequences.shape for s in sims)
        assert any(math.isnan(float(s[0, 0])) for s in sims)  # the prompt is out of scope at most steps
