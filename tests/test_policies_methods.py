"""The method policies (dyllm, es_dllm, dllm_cache) and their composition with block caches:
decisions on constructed inputs, and the keep-everything limits that must equal vanilla."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import dyllm_fx
from dyllm_fx.runtime.policies import (
    DLLMCachePolicy, DyLLMPolicy, ESDLLMPolicy, StepState, make_policy,
)
from dyllm_fx.runtime.policies.es_dllm import importance, keep_top
from tiny_checkpoints import tiny_tokenizer

MASK = 7


def _state(ids, block=(4, 8), response_start=4, cold=False, cache=None, kv_probe=None):
    return StepState(
        ids, torch.ones_like(ids), 1, *block, cold, response_start=response_start, cache=cache,
        kv_probe=kv_probe, mask_token_id=MASK,
    )


def _cache(n_layers=3, bsz=2, seq=12, kv=2, d=4, hidden=6):
    return SimpleNamespace(
        k=[torch.zeros(bsz, kv, seq, d) for _ in range(n_layers)],
        v=[torch.zeros(bsz, kv, seq, d) for _ in range(n_layers)],
        hidden=[torch.zeros(bsz, seq, hidden) for _ in range(n_layers + 1)],
    )


# --- DyLLM ---------------------------------------------------------------------------------


def test_dyllm_marks_exactly_the_rows_below_tau():
    policy = DyLLMPolicy(tau=0.99)
    cos = torch.tensor([[1.0, 0.985, 0.995, 0.2, 0.99], [0.999, 0.999, 0.5, 0.989, 1.0]])
    salient = policy.approx_salient(0, cos, start=10)
    assert salient.tolist() == [[11, 13], [12, 13]]
    everything = DyLLMPolicy(tau=1.0).approx_salient(0, cos, start=10)
    assert everything.tolist() == [list(range(10, 15))] * 2


def test_dyllm_layer0_changed_rows_are_the_tokens_that_changed_and_refresh_rules():
    policy = DyLLMPolicy(tau=0.99, refresh_interval=3)
    ids = torch.tensor([[1, 2, 3, 4, MASK, MASK, MASK, MASK, MASK, MASK]])
    policy.begin_step(_state(ids, cold=True))
    assert policy.refresh and policy.approx_layer(0, None) is None
    step2 = ids.clone()
    step2[0, 6] = 9
    policy.begin_step(_state(step2))
    start, end, changed = policy.approx_layer(0, None)
    assert (start, end) == (4, 10) and changed.tolist() == [[6]]
    policy.approx_salient(0, torch.tensor([[1.0, 0.5, 1.0, 1.0, 0.1, 1.0]]), start)
    assert policy.approx_layer(1, None)[2].tolist() == [[5, 8]]  # layer 1 recomputes layer 0's salient rows
    policy.begin_step(_state(step2))
    assert not policy.refresh and policy.approx_layer(0, None)[2].shape == (1, 0)  # nothing changed
    policy.begin_step(_state(step2))
    assert policy.refresh  # third step since the last refresh
    policy.begin_step(_state(step2, block=(8, 10)))
    assert policy.refresh  # a new block



def test_step_state_span_rows_lists_the_span_for_every_element():
    state = _state(torch.zeros(3, 10, dtype=torch.long))
    assert state.span_rows(4, 7).tolist() == [[4, 5, 6]] * 3
    assert state.span_rows(*state.span("block")).tolist() == [[4, 5, 6, 7]] * 3


def test_dyllm_under_a_block_cache_refreshes_only_the_block_at_its_interval():
    policy = make_policy("dual_cache+dyllm", tau=0.99, refresh_interval=2)
    ids = torch.tensor([[1, 2, 3, 4, MASK, MASK, MASK, MASK, MASK, MASK]])
    policy.begin_step(_state(ids, cold=True))
    assert policy.refresh and policy.rows(0, _state(ids)) is None  # cold: every row
    policy.begin_step(_state(ids))
    assert not policy.refresh
    policy.begin_step(_state(ids))  # the interval's refresh: the block (4, 8) only
    assert policy.refresh and policy.rows(0, _state(ids)).tolist() == [[4, 5, 6, 7]]
    policy.begin_step(_state(ids, block=(8, 10)))  # a new block: every row again
    assert policy.refresh and policy.rows(0, _state(ids, block=(8, 10))) is None
    alone = DyLLMPolicy(tau=0.99, refresh_interval=1)  # scope "response": always the whole sequence
    alone.begin_step(_state(ids, cold=True))
    alone.begin_step(_state(ids))
    assert alone.refresh and alone.rows(0, _state(ids)) is None

@pytest.mark.parametrize("tau", [0.0, -0.1, 1.01])
def test_dyllm_rejects_tau_outside_unit_interval(tau):
    with pytest.raises(ValueError, match="tau"):
        DyLLMPolicy(tau=tau)


# --- ES-dLLM -------------------------------------------------------------------------------


def test_es_dllm_keeps_the_top_k_by_its_formula():
    ids = torch.tensor([[1, 2, 3, 4, MASK, MASK, 9, MASK, 9, MASK, MASK, MASK]] * 2)
    policy = ESDLLMPolicy(skip_layers=(1,), keep=0.5, alpha=0.3, variation="hidden", keep_confident=1)
    cache = _cache()
    policy.begin_step(_state(ids, cold=True, cache=cache))
    rows = torch.arange(12).expand(2, -1)
    old = torch.randn(2, 12, 6, generator=torch.Generator().manual_seed(0))
    policy.after_block(1, rows, old)  # a refresh step: only records the snapshot
    conf = torch.rand(2, 12, generator=torch.Generator().manual_seed(1))
    policy.after_logits(rows, torch.log(torch.stack([conf, 1 - conf], -1)))
    policy.begin_step(_state(ids, cache=cache))
    scope = policy.rows(0, None)
    assert scope.tolist() == [list(range(4, 12))] * 2  # response rows run the first layers
    new = old + torch.randn(2, 12, 6, generator=torch.Generator().manual_seed(2))
    policy.after_block(1, scope, new[:, 4:])

    change = (new[:, 4:] - old[:, 4:]).abs().mean(-1)
    c = conf.clamp_min(1 - conf)[:, 4:]  # the top probability of the two-way softmax
    score = 0.3 * c + 0.7 * change / change.amax(1, keepdim=True)
    masked = ids[:, 4:] == MASK
    forced = torch.where(masked, c, -1.0).argmax(1)
    for b in range(2):
        order = [int(i) for i in score[b].argsort(descending=True) if int(i) != int(forced[b])]
        want = sorted([int(forced[b]) + 4] + [i + 4 for i in order[:3]])
        assert policy.rows(2, None)[b].tolist() == want


def test_es_dllm_helpers():
    score = importance(torch.tensor([[0.0, 1.0, 0.5]]), torch.tensor([[2.0, 0.0, 4.0]]), alpha=0.5)
    torch.testing.assert_close(score, torch.tensor([[0.25, 0.5, 0.75]]))
    rows = torch.tensor([[3, 5, 8, 9]])
    assert keep_top(rows, torch.tensor([[0.1, 0.9, 0.5, 0.2]]), 2).tolist() == [[5, 8]]
    assert keep_top(rows, torch.tensor([[0.1, 0.9, 0.5, 0.2]]), 2, torch.tensor([[True, False, False, False]])).tolist() == [[3, 5]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(skip_layers=(3, 1)), "increasing"), (dict(keep=(0.5,)), "one value per skip layer"),
    (dict(alpha=2.0), "alpha"), (dict(variation="attention"), "variation"), (dict(keep=0.0), "keep"),
])
def test_es_dllm_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ESDLLMPolicy(**kwargs)


# --- dLLM-Cache ----------------------------------------------------------------------------


def test_dllm_cache_refreshes_the_rows_whose_values_moved_most():
    ids = torch.tensor([[1, 2, 3, 4, MASK, MASK, MASK, MASK]])
    cache = _cache(bsz=1, seq=8)
    g = torch.Generator().manual_seed(0)
    cache.v[0] = torch.randn(1, 2, 8, 4, generator=g)
    v_new = cache.v[0].clone()
    v_new[:, :, 5] = -v_new[:, :, 5]  # similarity -1
    v_new[:, :, 7] += 0.3 * torch.randn(1, 2, 4, generator=g)  # slightly moved
    probe = lambda layer, rows: (None, v_new.gather(2, rows[:, None, :, None].expand(-1, 2, -1, 4)))
    policy = DLLMCachePolicy(prompt_interval=10, response_interval=4, ratio=0.5)

    def step(cold=False):
        state = _state(ids, cold=cold, cache=cache, kv_probe=probe)
        policy.begin_step(state)
        return policy.rows(0, state)

    assert step(cold=True) is None
    assert step().tolist() == [[5, 7]]
    step(), step()
    assert step().tolist() == [[4, 5, 6, 7]]  # the response interval: the whole response


# --- composition ---------------------------------------------------------------------------


def test_composition_gives_the_row_policy_the_block_scope():
    policy = make_policy(["dual_cache", "dyllm"], tau=0.95)
    assert isinstance(policy, DyLLMPolicy) and policy.scope == "block" and policy.name == "dual_cache+dyllm"
    assert make_policy("prefix_cache+es_dllm").scope == "suffix"


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


# --- end to end on a tiny model ------------------------------------------------------------

KEEP_ALL = [
    ("dyllm", dict(tau=1.0, scope="all")),
    ("es_dllm", dict(keep=1.0, scope="all", skip_layers=(0,))),
    ("dllm_cache", dict(ratio=1.0, scope="all")),
]


@pytest.fixture(scope="module")
def tiny():
    from tiny_checkpoints import tiny_llada

    return tiny_llada(seed=11, n_layers=3).eval(), tiny_tokenizer()


@pytest.fixture(scope="module")
def vanilla(tiny):
    model, tok = tiny
    return dyllm_fx.generate(model, tok, ["abc", "hello wor"], gen_length=16, block_length=8, steps=16, progress=False)


@pytest.mark.parametrize("name, cfg", KEEP_ALL)
def test_keep_everything_equals_vanilla_token_for_token(tiny, vanilla, name, cfg):
    model, tok = tiny
    tm = dyllm_fx.transform(model, policy=name, **cfg)
    out = dyllm_fx.generate(tm, tok, ["abc", "hello wor"], gen_length=16, block_length=8, steps=16, progress=False)
    assert torch.equal(out.sequences, vanilla.sequences)
    assert len(tm.engine.records) == out.stats.nfe


@pytest.fixture(scope="module")
def trained():
    """The embedded trained model: agreement with vanilla means something only on a model
    whose predictions are not noise."""
    from dyllm_fx.tasks import held_out_set

    model, tok = dyllm_fx.load("default")
    prompts = [e.prompt for e in held_out_set(2, ("shift",), seed=0)]
    ref = dyllm_fx.generate(model, tok, prompts, gen_length=32, block_length=16, steps=32, progress=False)
    return model, tok, prompts, ref


@pytest.mark.parametrize("name, cfg", [
    ("dyllm", {}), ("es_dllm", {}), ("es_dllm", {"variation": "query"}), ("es_dllm", {"variation": "key"}),
    ("es_dllm", {"variation": "hidden"}), ("dllm_cache", {}), ("dual_cache+dyllm", {}), ("prefix_cache+es_dllm", {}),
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
        assert all(math.isnan(float(s[0, 0])) for s in sims)  # the prompt's first row is out of scope
