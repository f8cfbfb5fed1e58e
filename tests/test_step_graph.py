"""One step = one graph, for every policy: the step compiles whole (fullgraph, no graph break),
compiled and eager steps give the same tokens, the capacity does not change tokens while nothing
overflows, torch.compile(backend="dyllm") runs every policy, torch.export takes the step, and
explain() shows the gating ops.

Compiling with inductor is slow on this CPU, so most checks use torch.compile's ``aot_eager``
backend: the same whole-graph capture (dynamo, fullgraph=True) and functionalisation, without
code generation. Two policies also go through inductor.
"""

from __future__ import annotations

import pytest
import torch

import dyllm_fx
from dyllm_fx.models.layers import default_position_ids
from tiny_checkpoints import tiny_dream, tiny_llada, tiny_tokenizer

# Slow (`-m "not slow"` leaves it out): compiles whole steps with torch.compile.
pytestmark = pytest.mark.slow

TOK = tiny_tokenizer()
PROMPTS = ["rev:abc=", "kv:a1,b2?ab="]
GEN = dict(gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)
POLICIES = [
    ("dense", {}),
    ("fixed", {"rows": [2, 9, 11]}),
    ("dual_cache", {}),
    ("prefix_cache", {}),
    ("dllm_cache", {}),
    ("dyllm", {}),
    ("dyllm", {"cached_softmax_stats": True}),
    ("es_dllm", {}),
    ("es_dllm", {"variation": "value"}),
    ("dual_cache+dyllm", {}),
    ("dual_cache+dyllm", {"mlp_selection": "batch", "kv_selection": "batch"}),
    ("dual_cache+es_dllm", {}),
    ("prefix_cache+dyllm", {}),
]


def _ids(params):
    return "-".join([params[0], *(f"{k}={v}" for k, v in params[1].items())])


@pytest.fixture(scope="module")
def model():
    m = tiny_llada(seed=21, n_layers=2)
    head = m.model.transformer.ff_out.weight
    with torch.no_grad():
        head.mul_(3.0)  # larger logit gaps: no near-ties between runs
        head[m.diffusion.mask_token_id] = 0.0  # never predicts the mask itself: every block completes
    return m


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name, cfg", POLICIES, ids=[_ids(p) for p in POLICIES])
def test_compiled_whole_step_gives_the_eager_tokens(model, dynamo, name, cfg):
    eager = dyllm_fx.generate(dyllm_fx.transform(model, policy=name, **cfg), TOK, PROMPTS, **GEN)
    tm = dyllm_fx.transform(model, policy=name, compile="aot_eager", **cfg)
    got = dyllm_fx.generate(tm, TOK, PROMPTS, **GEN)
    assert torch.equal(got.sequences, eager.sequences)
    kinds = {r.kind for r in tm.engine.records}
    assert tm.engine.compiler.graphs >= len(kinds)  # every kind of step went through the compiler
    before = tm.engine.compiler.graphs
    dyllm_fx.generate(tm, TOK, PROMPTS[::-1], **GEN)  # same shapes: nothing is compiled again
    assert tm.engine.compiler.graphs == before


@pytest.mark.parametrize("name, cfg", [("dual_cache+dyllm", {}), ("es_dllm", {})])
def test_inductor_compiled_step_gives_the_eager_tokens(model, dynamo, name, cfg):
    eager = dyllm_fx.generate(dyllm_fx.transform(model, policy=name, **cfg), TOK, PROMPTS, **GEN)
    tm = dyllm_fx.transform(model, policy=name, compile=True, **cfg)
    assert torch.equal(dyllm_fx.generate(tm, TOK, PROMPTS, **GEN).sequences, eager.sequences)
    # bounded recompiles: one graph per plan key the generation used
    keys = {(r.kind, r.capacity) for r in tm.engine.records}
    assert len(keys) <= tm.engine.compiler.graphs <= len(tm.engine._compiled) + 1


def test_each_plan_key_has_its_own_recompile_budget(model, dynamo, monkeypatch):
    """Dynamo counts recompiles per code object. The step functions of every plan key and engine
    must not share one count: a benchmark of many methods once failed at the 65th graph of the
    process (FailOnRecompileLimitHit). With a budget of one graph per plan key, two engines and
    their several keys still compile, and give the eager tokens."""
    from dyllm_fx.runtime import engine

    monkeypatch.setattr(engine, "RECOMPILE_LIMIT", 1)
    for name in ("dual_cache", "dual_cache+dyllm"):
        eager = dyllm_fx.generate(dyllm_fx.transform(model, policy=name), TOK, PROMPTS, **GEN)
        tm = dyllm_fx.transform(model, policy=name, compile="aot_eager")
        assert torch.equal(dyllm_fx.generate(tm, TOK, PROMPTS, **GEN).sequences, eager.sequences)
        assert len(tm.engine._compiled) >= 2  # several plan keys, one graph each


@pytest.fixture(scope="module")
def trained():
    """The embedded trained model: its saliency is sparse, as a real model's is (a random one
    marks most rows salient at every step)."""
    from dyllm_fx.eval.synthetic_tasks import held_out_set

    model, tok = dyllm_fx.load("default")
    return model, tok, [e.prompt for e in held_out_set(2, ("shift",), seed=0)]


@pytest.mark.parametrize("name", ["dyllm", "dual_cache+dyllm", "prefix_cache+dyllm"])
def test_capacity_changes_no_token_while_nothing_overflows(trained, name):
    model, tok, prompts = trained
    gen = dict(gen_length=32, block_length=16, steps=32, progress=False)
    # tau 0.85: on the embedded model no step of these prompts wants more than 8 rows
    small = dyllm_fx.transform(model, policy=name, tau=0.85, capacity=8)
    full = dyllm_fx.transform(model, policy=name, tau=0.85, capacity="full")
    a = dyllm_fx.generate(small, tok, prompts, **gen)
    b = dyllm_fx.generate(full, tok, prompts, **gen)
    assert sum(a.stats.overflow) == 0, "this setting must not overflow for the comparison to hold"
    assert set(a.stats.capacity) - {0} == {8} and max(b.stats.capacity) > 8
    assert torch.equal(a.sequences, b.sequences)


def test_overflow_is_counted_and_approximated(model):
    """A capacity below what qualifies: the step still runs, and the overflow is reported."""
    tm = dyllm_fx.transform(model, policy="dyllm", capacity=1, tau=0.999999, overflow="approximate")
    out = dyllm_fx.generate(tm, TOK, PROMPTS, **GEN)
    assert sum(out.stats.overflow) > 0 and len(out.stats.overflow) == out.stats.nfe
    assert all(r.overflow == o for r, o in zip(tm.engine.records, out.stats.overflow))


# --- torch.compile(model, backend="dyllm") --------------------------------------------------

BACKEND = [
    "dense",
    "dual_cache",
    "prefix_cache",
    "dyllm",
    "es_dllm",
    "dllm_cache",
    "dual_cache+dyllm",
    "dual_cache+es_dllm",
]


@pytest.mark.parametrize("name", BACKEND)
def test_backend_runs_every_policy(model, dynamo, name):
    """Through the backend every step is a forward() call: the block, the response start and
    the last step's commits are inferred from the tokens, so the tokens are those of the same
    policy through generate()."""
    opts = {
        "policy": name,
        "mask_token_id": model.diffusion.mask_token_id,
        "block_length": 8,
        "compile_step": False,
    }
    compiled = torch.compile(model, backend="dyllm", options=opts)
    got = dyllm_fx.generate(compiled, TOK, PROMPTS, **GEN)
    want = dyllm_fx.generate(dyllm_fx.transform(model, policy=name), TOK, PROMPTS, **GEN)
    assert torch.equal(got.sequences, want.sequences)


def test_backend_sparse_steps_on_dynamos_static_graph(dynamo):
    """Regression: dynamo's first graph has literal sizes (``view(1, 29, 4, 32)``); the pieces
    cut from it failed on the first sparse step ("shape '[1, 29, 4, 32]' is invalid for input of
    size 1024"). The backend now traces the module itself, with symbolic sizes."""
    model = tiny_llada(seed=3, d_model=128, n_heads=4, n_layers=2, mlp_hidden_size=64)
    compiled = torch.compile(
        model,
        backend="dyllm",
        options={"policy": "fixed", "rows": [3, 4], "compile_step": False, "mask_token_id": 1},
    )
    reference = dyllm_fx.transform(model, policy="fixed", rows=[3, 4])
    ids = torch.randint(3, 40, (1, 29))
    ids[:, 20:] = 1
    pos = default_position_ids(ids, None)
    with torch.no_grad():
        for tokens in (ids, ids.index_fill(1, torch.tensor([21]), 7)):  # cold, then a sparse step
            got = compiled(tokens, position_ids=pos)
            want = reference(tokens, position_ids=pos)
    assert reference.engine.records[-1].active == [2, 2]  # the second call was sparse
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_backend_with_inductor(model, dynamo):
    opts = {"policy": "dual_cache+dyllm", "mask_token_id": model.diffusion.mask_token_id, "block_length": 8}
    compiled = torch.compile(model, backend="dyllm", options=opts)
    got = dyllm_fx.generate(compiled, TOK, PROMPTS, **GEN)
    want = dyllm_fx.generate(dyllm_fx.transform(model, policy="dual_cache+dyllm"), TOK, PROMPTS, **GEN)
    assert torch.equal(got.sequences, want.sequences)


# --- torch.export and explain -------------------------------------------------------------


class _Step(torch.nn.Module):
    """One plan's step as a module torch.export can take (caches as buffers it mutates)."""

    def __init__(self, engine, plan):
        super().__init__()
        self.engine, self.plan = engine, plan

    def forward(self, input_ids, position_ids, logit_positions, span_start, span_len):
        from dyllm_fx.runtime.policies import StepInputs

        inp = StepInputs(
            input_ids,
            torch.ones_like(input_ids),
            position_ids,
            logit_positions,
            block_rows=logit_positions,
            span_start=span_start,
            span_len=span_len,
        )
        out = self.engine.policy.step(
            self.engine.pieces, self.plan, inp, self.engine.cache, self.engine.buffers
        )
        return out.logits, out.counts


def test_torch_export_takes_a_dyllm_sparse_step(model):
    tm = dyllm_fx.transform(model, policy="dyllm", num_full_steps=1)
    engine = tm.engine
    ids = torch.full((1, 14), model.diffusion.mask_token_id)
    ids[:, :6] = torch.arange(3, 9)
    pos = torch.arange(14)[None]
    with torch.no_grad():
        tm(ids, None, pos)  # the dense step fills the caches
        ids[0, 7] = 20
        plan = engine.policy.plan(
            dyllm_fx.runtime.policies.HostState(
                ids,
                torch.ones_like(ids),
                False,
                2,
                step=1,
                block_start=6,
                block_end=14,
                response_start=6,
                mask_token_id=1,
                last_committed=1,
            )
        )
        assert plan.kind == "sparse"
        args = (ids, pos, torch.arange(6, 14)[None], plan.span_start, plan.span_len)
        exported = torch.export.export(_Step(engine, type(plan)(plan.key)), args, strict=False)
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("sort" in o for o in ops) and any("gather" in o for o in ops)  # the selection is in the graph


def test_explain_shows_the_gating_ops_of_each_step_graph(model):
    text = dyllm_fx.explain(dyllm_fx.transform(model, policy="dual_cache+dyllm"))
    sparse = [line for line in text.splitlines() if "'sparse'" in line]
    assert sparse and all("gating: sort" in line and "gather" in line for line in sparse)
    assert any("('full',)" in line for line in text.splitlines())


def test_dream_compiles_too(dynamo):
    model = tiny_dream(seed=5, num_hidden_layers=2)
    eager = dyllm_fx.generate(dyllm_fx.transform(model, policy="es_dllm"), TOK, PROMPTS, **GEN)
    tm = dyllm_fx.transform(model, policy="es_dllm", compile="aot_eager")
    assert torch.equal(dyllm_fx.generate(tm, TOK, PROMPTS, **GEN).sequences, eager.sequences)
