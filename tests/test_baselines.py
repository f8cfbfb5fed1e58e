"""The Fast-dLLM reference loop (dyllm_fx/eval/plain_loop_baseline.py) gives the block-cache
policies' tokens."""

import pytest
import torch

import dyllm_fx
from dyllm_fx.eval.plain_loop_baseline import FastDLLMReference
from tiny_checkpoints import tiny_dream, tiny_llada, tiny_tokenizer


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [lambda: tiny_llada(seed=7, n_layers=2), lambda: tiny_dream(seed=8, num_hidden_layers=2)],
    ids=["llada", "dream"],
)
@pytest.mark.parametrize("mode, policy", [("dual", "dual_cache"), ("prefix", "prefix_cache")])
def test_reference_loop_equals_the_policy(make, mode, policy):
    model, tok = make(), tiny_tokenizer()
    kw = dict(gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)
    prompts = ["rev:abc=", "kv:a1,b2?ab="]
    want = dyllm_fx.generate(dyllm_fx.transform(model, policy=policy), tok, prompts, **kw)
    got = dyllm_fx.generate(FastDLLMReference(model, mode), tok, prompts, **kw)
    assert torch.equal(got.sequences, want.sequences)


def test_reference_loop_rejects_other_models():
    with pytest.raises(TypeError, match="LLaDA and Dream"):
        FastDLLMReference(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode"):
        FastDLLMReference(tiny_llada(seed=0), mode="triple")
