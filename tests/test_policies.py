"""What every registered policy guarantees, and the compositions of a block cache with a row policy.

* Every policy: ragged batches (each prompt of a left-padded batch gets the tokens it
  gets alone, and no policy ever selects a left-pad position), determinism (the same seed gives
  the same tokens) and failures (an exception from a policy hook or a KeyboardInterrupt inside a
  step leaves the transformed model usable). Policies are read from ``POLICIES`` at collection
  time, so new ones are picked up; each is built with the parameters that keep every row when
  it has them, else with its defaults (``fixed`` needs explicit rows and is skipped there).
* Compositions: block caches composed with row policies, and the methods on the trained
  embedded model.

Each policy's own semantics are in test_policy_<name>.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import dyllm_fx
from dyllm_fx.runtime.policies import DyLLMPolicy, Policy, UniformPolicy, make_policy
from dyllm_fx.transform import TransformedModel
from policy_helpers import COMPOSED, NAMES, build_policy, fresh
from tiny_checkpoints import tiny_tokenizer

# ==========================================================================================
# every policy: ragged batches, determinism, failures
# ==========================================================================================
TOK = tiny_tokenizer()
RAGGED = ["rev:abc=", "kv:a1,b2?ab=", "x=1?"]  # 8, 12 and 4 tokens: left padding of 4 and 8
GEN = dict(gen_length=16, block_length=8, steps=8, stop_at_eos=False, progress=False)


# Plan kinds whose rows a policy chooses (the others recompute everything, padding included:
# a cold step, a dense refresh, ES-dLLM's [0, block end) prompt refresh).
CHOSEN = {"span", "rows", "sparse", "skip", "adaptive", "response"}


def _ragged_mask(prompts, gen_length: int) -> torch.Tensor:
    """(B, P + G) 1 for real tokens, 0 for the left padding generate() adds to ``prompts``."""
    TOK.padding_side = "left"
    mask = TOK(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)["attention_mask"]
    return torch.cat([mask, torch.ones(mask.shape[0], gen_length, dtype=mask.dtype)], 1)


def _pad_rows_selected(model: TransformedModel, attention_mask: torch.Tensor) -> list[str]:
    """Steps at which a chosen row set recomputed a left-pad position in some layer (from the
    engine's activity records: 1 recomputed, 0.5 attention only)."""
    bad = []
    pad = attention_mask == 0
    for step, record in enumerate(model.engine.records):
        if record.kind in CHOSEN and record.activity is not None:
            hit = (record.activity == 1.0) & pad[None]
            if hit.any():
                layers, rows, cols = hit.nonzero(as_tuple=True)
                bad.append(
                    f"step {step} ({record.kind}), layer {int(layers[0])}: row {int(rows[0])}, position "
                    f"{int(cols[0])}"
                )
    return bad


# --------------------------------------------------------------------------- ragged batches


RAGGED_CASES = [(n, arch) for n in NAMES for arch in ("llada", "dream")] + [(n, "llada") for n in COMPOSED]


@pytest.mark.parametrize("name, arch", RAGGED_CASES)
def test_ragged_batch_equals_each_prompt_alone(programs, arch, name):
    policy = build_policy(name)
    model = fresh(programs, arch, policy)
    model.engine.record_activity = True
    batch = dyllm_fx.generate(model, TOK, RAGGED, **GEN)
    bad = _pad_rows_selected(model, _ragged_mask(RAGGED, GEN["gen_length"]))
    assert batch.sequences.shape[1] == len(RAGGED[1]) + GEN["gen_length"]
    for row, prompt in enumerate(RAGGED):
        alone = dyllm_fx.generate(model, TOK, prompt, **GEN)
        assert torch.equal(batch.responses[row], alone.responses[0]), f"{name}: prompt {prompt!r}"
        assert batch.texts[row] == alone.texts[0]
    assert batch.responses.unique().numel() > 3  # the comparison is about something
    assert not bad, f"policy {name!r} selected left-pad positions: {bad[:3]}"


def _default_variants():
    """Every policy at its defaults, plus DyLLM over the whole sequence (scope 'all') and with a
    whole-sequence query at every step."""
    out = [pytest.param(n, {}, id=n) for n in NAMES + COMPOSED if n != "fixed"]
    if "dyllm" in NAMES:
        out.append(pytest.param("dyllm", {"scope": "all"}, id="dyllm-scope-all"))
        out.append(
            pytest.param("dyllm", {"full_query_interval": 1, "num_full_steps": 1}, id="dyllm-query-all")
        )
    return out


@pytest.mark.parametrize("name, params", _default_variants())
def test_no_policy_selects_left_padding(programs, name, params):
    model = fresh(programs, "llada", make_policy(name, **params))
    model.engine.record_activity = True
    dyllm_fx.generate(model, TOK, RAGGED, **GEN)
    chosen = [r for r in model.engine.records if r.kind in CHOSEN]
    assert chosen or name == "dense", "no step chose its rows: the check would be vacuous"
    bad = _pad_rows_selected(model, _ragged_mask(RAGGED, GEN["gen_length"]))
    assert not bad, f"policy {name!r} {params} selected left-pad positions ({len(bad)} times): {bad[:2]}"


def test_the_padding_check_catches_a_policy_that_selects_padding(programs):
    """The padding check above can fail: a policy that always recomputes positions 0-3 is caught."""

    class FirstColumns(UniformPolicy):
        name = "first_columns"

        def rows(self, host):
            return torch.arange(4).expand(host.batch, -1)

    model = fresh(programs, "llada", FirstColumns())
    model.engine.record_activity = True
    dyllm_fx.generate(model, TOK, RAGGED, **{**GEN, "steps": 4})
    assert _pad_rows_selected(model, _ragged_mask(RAGGED, GEN["gen_length"]))


# --------------------------------------------------------------------------- determinism


SAMPLING = {
    "llada": dict(temperature=1.0, remasking="random"),
    "dream": dict(temperature=1.0, alg="origin"),
}


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_tokens(programs, arch, name):
    kw = {**GEN, **SAMPLING[arch]}
    model = fresh(programs, arch, build_policy(name))
    a = dyllm_fx.generate(model, TOK, RAGGED, seed=7, **kw).sequences
    b = dyllm_fx.generate(model, TOK, RAGGED, seed=7, **kw).sequences  # same model, warm buffers
    c = dyllm_fx.generate(fresh(programs, arch, build_policy(name)), TOK, RAGGED, seed=7, **kw).sequences
    other = dyllm_fx.generate(model, TOK, RAGGED, seed=8, **kw).sequences
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, other)  # the seed matters


# --------------------------------------------------------------------------- failures in the middle


class Boom(RuntimeError):
    pass


def _fail_in_policy_step(policy: Policy, at_step: int):
    """The policy's ``at_step``-th step of a generation (counting from 0) fails half way: it
    writes into the caches, then raises. Returns the undo."""
    inner = policy.step
    calls = [0]

    def failing(pieces, plan, inp, cache, buffers):
        calls[0] += 1
        if calls[0] == at_step + 1:
            for k in cache.k:  # a half-written cache, as a failure mid-step leaves it
                k.add_(1.0)
            raise Boom(f"policy step failed at step {at_step}")
        return inner(pieces, plan, inp, cache, buffers)

    policy.step = failing
    return lambda: delattr(policy, "step")


def _interrupt_piece(model: TransformedModel, layer: int, on_call: int):
    """Make the MLP piece of ``layer`` raise KeyboardInterrupt on its ``on_call``-th call
    (every layer kind runs it, after attention has written that layer's K/V)."""
    pieces = model.engine.pieces
    inner = pieces._mlp[layer]
    calls = [0]

    def piece(*args):
        calls[0] += 1
        if calls[0] == on_call:
            raise KeyboardInterrupt
        return inner(*args)

    pieces._mlp[layer] = piece
    return lambda: pieces._mlp.__setitem__(layer, inner)


FAILURE_CASES = [(n, f) for n in NAMES for f in ("exception-in-policy-step", "keyboard-interrupt-in-step")]
FAILURE_CASES += [(n, "exception-in-policy-step") for n in COMPOSED]


@pytest.mark.parametrize("name, failure", FAILURE_CASES)
def test_failed_generation_leaves_the_model_usable(programs, name, failure):
    want = dyllm_fx.generate(fresh(programs, "llada", build_policy(name)), TOK, RAGGED, **GEN)
    policy = build_policy(name)
    model = fresh(programs, "llada", policy)
    dyllm_fx.generate(model, TOK, RAGGED, **GEN)  # a complete generation first: the cache is warm
    if failure == "exception-in-policy-step":
        restore, expected = _fail_in_policy_step(policy, at_step=5), Boom
    else:
        restore, expected = _interrupt_piece(model, layer=1, on_call=6), KeyboardInterrupt
    with pytest.raises(expected):
        dyllm_fx.generate(model, TOK, RAGGED, **GEN)
    restore()
    got = dyllm_fx.generate(model, TOK, RAGGED, **GEN)
    assert torch.equal(got.sequences, want.sequences)
    assert len(model.engine.records) == got.stats.nfe  # the failed run's records are gone
    assert model.engine.records[0].active == [got.sequences.shape[1]] * model.engine.n_layers  # a cold start


def test_interrupted_forward_step_recovers(programs, models):
    """Through forward(): a warm step interrupted half way leaves K/V written for some layers
    only; the engine then treats the cache as cold, so the repeated step recomputes every row
    (the original model's logits), never a mix of two steps."""
    model = models["llada"]
    mask_id = model.diffusion.mask_token_id
    ids0 = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(3))
    ids0[:, 6:] = mask_id
    ids1 = ids0.clone()
    ids1[:, 7] = 21
    with torch.no_grad():
        tm = fresh(programs, "llada", make_policy("fixed", rows=[6, 7, 8]))
        tm(ids0)
        restore = _interrupt_piece(tm, layer=1, on_call=1)  # the warm step, after layer 0 wrote its rows
        with pytest.raises(KeyboardInterrupt):
            tm(ids1)
        restore()
        again = tm(ids1)
        torch.testing.assert_close(again, model(ids1), rtol=0, atol=1e-5)
        assert (
            tm.engine.records[-1].active == [12] * tm.engine.n_layers
        )  # a full step, not the policy's 3 rows
        torch.testing.assert_close(tm(ids1), again, rtol=0, atol=1e-5)  # and warm again after it


def test_forward_after_generate_does_not_reuse_the_generation_cache(programs, models):
    model = models["llada"]
    tm = fresh(programs, "llada", make_policy("fixed", rows=[0, 1]))
    ids = torch.randint(3, 40, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        first = tm(ids)
        dyllm_fx.generate(
            tm, TOK, "rev:", gen_length=8, block_length=8, steps=8, progress=False
        )  # (1, 12) too
        again = tm(ids)  # same ids as the last forward() call, but the cache holds the generation
        torch.testing.assert_close(again, first, rtol=0, atol=1e-5)
        torch.testing.assert_close(again, model(ids), rtol=0, atol=1e-5)


def test_failed_cache_allocation_is_retried(programs, models, monkeypatch):
    """Out of memory while the engine allocates the policy's buffers after the step cache (here
    DyLLM's contexts and MLP outputs): the next call allocates them again (the step cache alone
    must not be taken as a complete set of buffers)."""
    from dyllm_fx.runtime.cache import StepCache

    ids = torch.randint(3, 40, (2, 11), generator=torch.Generator().manual_seed(5))
    want_model = fresh(programs, "llada", make_policy("dyllm", num_full_steps=1))
    with torch.no_grad():
        want = [want_model(ids), want_model(ids)]
    tm = fresh(programs, "llada", make_policy("dyllm", num_full_steps=1))

    armed = [False]
    real_allocate = StepCache.allocate.__func__

    def allocate_then_arm(cls, *args, **kwargs):
        cache = real_allocate(cls, *args, **kwargs)
        armed[0] = True  # the next tensor the engine allocates fails
        return cache

    def failing(real):
        def alloc(*args, **kwargs):
            if armed[0]:
                armed[0] = False
                raise MemoryError("simulated: no room for the MLP cache")
            return real(*args, **kwargs)

        return alloc

    with torch.no_grad():
        with monkeypatch.context() as patch:
            patch.setattr(StepCache, "allocate", classmethod(allocate_then_arm))
            for fn in ("zeros", "zeros_like", "empty", "empty_like"):
                patch.setattr(torch, fn, failing(getattr(torch, fn)))
            with pytest.raises(MemoryError):
                tm(ids)
        got = [tm(ids), tm(ids)]  # the user freed memory and tries again
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


class _NothingOnWarmSteps(UniformPolicy):
    """A custom policy that, on warm steps, recomputes no row at all (B, 0)."""

    name = "nothing"

    def rows(self, host):
        return torch.zeros(host.batch, 0, dtype=torch.long, device=host.device)


def test_policy_returning_no_rows(programs, models):
    """Every dyllm:: op accepts empty row sets (test_fuzz_ops_and_layouts.py); the engine should
    too: either keep every cached row (the logits of the previous step) or say what to return."""
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(6))
    tm = fresh(programs, "llada", _NothingOnWarmSteps())
    with torch.no_grad():
        cold = tm(ids)
        try:
            warm = tm(ids)
        except ValueError as err:  # acceptable: a clear error naming the hook and the fix
            assert "rows" in str(err) and "None" in str(err)
        else:
            assert torch.equal(warm, cold)
            assert tm.engine.records[-1].active == [0] * tm.engine.n_layers


# ==========================================================================================
# compositions of a block cache with a row policy
# ==========================================================================================
def test_composition_gives_the_row_policy_the_block_scope():
    policy = make_policy(["dual_cache", "dyllm"], tau=0.95)
    assert isinstance(policy, DyLLMPolicy) and policy.scope == "block" and policy.name == "dual_cache+dyllm"
    assert make_policy("prefix_cache+es_dllm").scope == "suffix"
    assert (
        make_policy("dual_cache+es_dllm").scope == make_policy("es_dllm").scope == "block"
    )  # ES-dLLM's own window


@pytest.mark.parametrize(
    "names, match",
    [
        (["dual_cache", "prefix_cache"], "cannot compose"),
        (["dyllm", "es_dllm"], "cannot compose"),
        (["dual_cache", "dense"], "cannot compose"),
        (["dual_cache", "nope"], "cannot compose"),
    ],
)
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


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, cfg",
    [
        ("dyllm", {}),
        ("dyllm", {"cached_softmax_stats": True}),
        ("es_dllm", {}),
        ("es_dllm", {"variation": "query"}),
        ("es_dllm", {"variation": "key"}),
        ("es_dllm", {"variation": "value"}),
        ("dllm_cache", {}),
        ("dual_cache+dyllm", {}),
        ("prefix_cache+es_dllm", {}),
    ],
)
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
