"""CUDA-graph replay of warm steps (runtime/cuda_graph.py), for every policy: the same tokens
and logits as the eager engine. Needs a CUDA device; skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

import dyllm_fx
from tiny_checkpoints import tiny_llada, tiny_tokenizer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device"),
]

POLICIES = [
    "dense",
    "dual_cache",
    "prefix_cache",
    "dllm_cache",
    "dyllm",
    "es_dllm",
    "dual_cache+dyllm",
    "dual_cache+es_dllm",
]


@pytest.fixture(scope="module")
def model():
    return tiny_llada(seed=4, n_layers=3).eval().cuda()


@pytest.mark.parametrize("policy", POLICIES)
def test_graphed_generation_equals_eager(model, policy):
    tok = tiny_tokenizer()
    prompts = ["abc", "hello wor"]
    kw = dict(gen_length=16, block_length=8, steps=16, progress=False)
    eager = dyllm_fx.transform(model, policy=policy)
    graphed = dyllm_fx.transform(model, policy=policy, cuda_graphs=True)
    want = dyllm_fx.generate(eager, tok, prompts, **kw)
    got = dyllm_fx.generate(graphed, tok, prompts, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert len(graphed.engine.graphs) >= 1
    again = dyllm_fx.generate(graphed, tok, prompts, **kw)  # replays only
    assert torch.equal(again.sequences, want.sequences)


def test_graphed_step_logits_match_eager(model):
    ids = torch.randint(3, 40, (2, 24), device="cuda")
    pos = torch.arange(24, device="cuda").expand(2, -1)
    block = torch.arange(8, 16, device="cuda").expand(2, -1)
    outs = []
    for graphs in (False, True):
        tm = dyllm_fx.transform(model, policy="fixed", rows=list(range(8, 16)), cuda_graphs=graphs)
        tm.engine.step(ids, None, pos, block)  # cold: fills the cache
        outs.append([tm.engine.step(ids, None, pos, block, step=1).logits for _ in range(2)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
