"""DyLLM (runtime/policies/dyllm.py) against its official semantics: the schedule of dense,
response-only and whole-sequence steps, one sparse step against a reference written out from the
model's weights, the capacity and its overflow, and the keep-everything limit."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import block_reference as ref
import dyllm_fx
from dyllm_fx.runtime.policies import DyLLMPolicy, HostState, make_policy
from dyllm_fx.runtime.policies.dyllm import COUNT_KINDS, FlatRows, is_flat_key, mlp_level, mlp_levels
from tiny_checkpoints import tiny_dream, tiny_llada, tiny_tokenizer

L, PROMPT, N_LAYERS = 24, 8, 2


def _host(step, block=(8, 16), cold=None, committed=1):
    ids = torch.zeros(2, L, dtype=torch.long)
    return HostState(
        ids,
        torch.ones_like(ids),
        step == 0 if cold is None else cold,
        N_LAYERS,
        step=step,
        block_start=block[0],
        block_end=block[1],
        response_start=PROMPT,
        mask_token_id=1,
        last_committed=committed,
    )


def _counts(need=3, kept=3):
    return [need, kept, 0] * (N_LAYERS + 1)


def _run_schedule(policy, steps=13):
    """(kind, span start, span length) of each step's plan; blocks of 8 from the prompt's end."""
    out = []
    for step in range(steps):
        block = (8, 16) if step < 8 else (16, 24)
        plan = policy.plan(_host(step, block))
        span = (int(plan.span_start[0]), int(plan.span_len[0])) if plan.span_start is not None else None
        out.append((plan.kind, span))
        policy.observe(plan, _counts() if plan.kind == "sparse" else None, N_LAYERS, L)
    return out


def test_schedule_follows_the_official_engine():
    """4 dense steps, then sparse steps over the response; the whole sequence is queried when
    the official processed_steps (step + 1) is a multiple of 4; no dense step at a block."""
    kinds = _run_schedule(DyLLMPolicy())
    response, whole = ("sparse", (PROMPT, L - PROMPT)), ("sparse", (0, L))
    assert kinds == [("full", None)] * 4 + [response] * 3 + [whole] + [response] * 3 + [whole] + [response]


def test_schedule_variants():
    kinds = [k for k, _ in _run_schedule(DyLLMPolicy(refresh_at_block=True))]
    assert kinds[8] == "full" and kinds.count("full") == 5  # the 4 first steps and the new block
    kinds = [k for k, _ in _run_schedule(DyLLMPolicy(refresh_interval=3))]
    assert kinds == ["full"] * 4 + ["sparse", "sparse", "full"] * 3
    spans = [s for _, s in _run_schedule(DyLLMPolicy(full_query_interval=None))]
    assert all(s in (None, (PROMPT, L - PROMPT)) for s in spans)  # the frozen-prompt variant
    spans = [s for _, s in _run_schedule(DyLLMPolicy(num_full_steps=2))]
    # processed_steps 3 and 4 are <= 4: the whole sequence, as the official prepare_sparse does
    assert spans[2:5] == [(0, L), (0, L), (PROMPT, L - PROMPT)]


def test_composed_with_the_dual_cache_the_block_is_the_scope():
    plans = _run_schedule(make_policy("dual_cache+dyllm"))
    # the dense warm-up recomputes the block only, as the dual cache's own steps: the rows
    # outside it are refreshed at the generation's and each block's first step
    assert plans[:4] == [("full", None)] + [("refresh", (8, 8))] * 3
    assert plans[8] == ("full", None)  # the block cache's refresh
    assert {s for k, s in plans if k == "sparse"} == {(8, 8), (16, 8)}  # never the whole sequence


def test_softmax_statistics_are_exact_by_default_and_cached_in_the_variant():
    def modes(policy):
        out = []
        for step in range(13):
            plan = policy.plan(_host(step))
            out.append(plan.key.stats if plan.kind == "sparse" else None)
            policy.observe(plan, _counts() if plan.kind == "sparse" else None, N_LAYERS, L)
        return out

    assert set(modes(DyLLMPolicy())) == {None, "exact"}
    cached = modes(DyLLMPolicy(cached_softmax_stats=True))
    # the first sparse step after the dense ones and the whole-sequence steps recompute them
    assert cached[4:] == [
        "exact",
        "cached",
        "cached",
        "exact",
        "cached",
        "cached",
        "cached",
        "exact",
        "cached",
    ]


def test_capacity_follows_the_last_step_and_counts_overflow():
    policy = DyLLMPolicy()
    for step in range(4):
        policy.plan(_host(step))
    first = policy.plan(_host(4, committed=2))
    # nothing measured yet: the whole span
    assert (first.key.width, first.key.capacity) == (L - PROMPT, L - PROMPT)
    report = policy.observe(first, [2, 2, 0] + [7, 5, 2] + [3, 3, 0], N_LAYERS, L)
    assert report.active == [5, 3] and report.overflow == 2 and report.capacity == 16
    # 7 rows wanted, half of that again as headroom: bucket 16
    assert policy.plan(_host(5)).key.capacity == 16
    for step in (5, 6, 7, 8):  # four steps that want 3 rows: the 7 leaves the history
        policy.observe(policy.plan(_host(step)), _counts(need=3), N_LAYERS, L)
    assert policy.plan(_host(9)).key.capacity == 8  # 3 + 2: the smallest bucket
    assert policy._needs[-4:] == [3, 3, 3, 3]
    assert DyLLMPolicy(capacity=5)._capacity(16, _host(5)) == 5
    assert DyLLMPolicy(capacity="full")._capacity(16, _host(5)) == 16
    assert DyLLMPolicy(every_row=True)._capacity(16, _host(5)) == 16  # every row is salient
    assert COUNT_KINDS == 3


def _batch_host(step, committed=1):
    """A batch of two, as ``_host``."""
    return _host(step, committed=committed)


def test_batch_wide_mlp_capacity_follows_the_batch_mean():
    """Under mlp_selection="batch" the counts hold one entry per layer for the K/V rows, then one
    per layer for the MLP, whose need is the batch's total: the next MLP capacity covers the
    mean per sequence (plus headroom), not the busiest sequence."""
    policy = DyLLMPolicy(mlp_selection="batch")
    for step in range(4):
        policy.plan(_batch_host(step))
    first = policy.plan(_batch_host(4))
    assert first.key.capacity == first.key.mlp_capacity == L - PROMPT  # nothing measured yet: the whole span
    # K/V: layer 0 changed 2, layer 0's salient rows (layer 1's K/V) 7 in one sequence;
    # MLP: 9 rows over the batch of 2 at layer 0 (4 kept in one sequence), 3 at layer 1
    counts = [2, 2, 0] + [7, 5, 2] + [9, 4, 1] + [3, 2, 0]
    report = policy.observe(first, counts, N_LAYERS, L)
    assert report.active == [4, 2] and report.overflow == 3 and report.extra["mlp_capacity"] == L - PROMPT
    plan = policy.plan(_batch_host(5))
    assert plan.key.capacity == 16  # 7 rows in one sequence, half of that again: bucket 16
    assert plan.key.mlp_capacity == 8  # ceil(9 / 2) = 5 rows per sequence, + 3 headroom: bucket 8
    assert policy._mlp_needs == [5]
    for step in (5, 6, 7, 8):  # the 9 leaves the history; 1 row per sequence: the smallest bucket
        policy.observe(policy.plan(_batch_host(step)), [1, 1, 0] * 2 + [2, 1, 0] * 2, N_LAYERS, L)
    late = policy.plan(_batch_host(9)).key
    assert (late.capacity, late.mlp_capacity) == (8, 2)
    assert DyLLMPolicy(mlp_selection="sequence").plan(_batch_host(0)).kind == "full"
    seq = DyLLMPolicy(mlp_selection="sequence")
    for step in range(4):
        seq.plan(_batch_host(step))
    assert seq.plan(_batch_host(4)).key.mlp_capacity is None  # one per-sequence selection per layer
    batch_wide = dict(mlp_selection="batch")
    assert DyLLMPolicy(capacity=5, **batch_wide)._mlp_capacity(16, 5, _batch_host(5)) == 5  # fixed
    assert DyLLMPolicy(capacity="full", **batch_wide)._mlp_capacity(16, 16, _batch_host(5)) == 16
    assert DyLLMPolicy().mlp_selection == "sequence"  # the default: the fewest rows approximated


def test_binding_to_a_program_whose_mlp_reads_tables_keeps_the_mlp_per_sequence():
    """An MLP that reads per-position tables must take one sequence's rows: ``bind`` turns the
    batch-wide selection off, and the plan key's MLP slot says so (None)."""
    reads = SimpleNamespace(mlp=[SimpleNamespace(tables=["cos"]), SimpleNamespace(tables=[])])
    plain = SimpleNamespace(mlp=[SimpleNamespace(tables=[])] * 2)
    for program, batch_wide in ((reads, False), (plain, True)):
        policy = DyLLMPolicy(mlp_selection="batch")
        policy.bind(program)
        assert policy.mlp_batch_wide is batch_wide
        for step in range(4):
            policy.plan(_batch_host(step))
        assert (policy.plan(_batch_host(4)).key.mlp_capacity is not None) is batch_wide
    sequence = DyLLMPolicy(mlp_selection="sequence")
    sequence.bind(plain)
    assert not sequence.mlp_batch_wide


def test_one_layer_counts_are_read_by_the_plan_not_by_their_length():
    """On a 1-layer model both counts layouts have two entries; the plan key decides which one
    the step wrote, so a batch-wide MLP's batch total sizes the MLP capacity, not the K/V one."""
    policy = DyLLMPolicy(mlp_selection="batch")
    for step in range(4):
        policy.plan(_batch_host(step))
    plan = policy.plan(_batch_host(4))
    assert plan.key.mlp_capacity is not None
    # layer 0's changed rows (2 in one sequence), then layer 0's MLP: 12 rows over the batch of 2
    report = policy.observe(plan, [2, 2, 0] + [12, 7, 0], 1, L)
    assert report.active == [7] and policy._needs == [2] and policy._mlp_needs == [6]


def test_mlp_levels_are_the_capacity_and_two_powers_of_two_below():
    assert mlp_levels(32) == [8, 16, 32] and mlp_levels(8) == [2, 4, 8]
    assert mlp_levels(114) == [32, 64, 114]  # a width that is no power of two: no 57 or 28
    assert mlp_levels(2) == [1, 2] and mlp_levels(1) == [1]
    assert [mlp_level(n, 32) for n in (0, 8, 9, 16, 17, 40)] == [8, 8, 16, 16, 32, 32]


@pytest.mark.parametrize("policy", ["dyllm", "dual_cache+dyllm"])
def test_batch_wide_mlp_selection_gives_the_per_sequence_tokens(policy):
    """With no overflow, the batch-wide MLP selection decodes the per-sequence selection's
    tokens (left-padded prompts of different lengths: the flat index must find each row's own
    sequence), and its MLP runs on fewer rows than B times the per-sequence capacity."""
    model, tok = _sharpened_llada(), tiny_tokenizer()
    prompts = ["rev:abcdefg=", "kv:a1?a=", "sort:dcba=", "add:12+34="]
    kw = dict(gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)
    runs = {}
    for selection in ("sequence", "batch"):
        tm = dyllm_fx.transform(model, policy=policy, tau=0.8, mlp_selection=selection)
        runs[selection] = (dyllm_fx.generate(tm, tok, prompts, **kw), tm.engine.records)
    for out, records in runs.values():
        assert sum(r.overflow for r in records) == 0  # otherwise the two may approximate different rows
    assert torch.equal(runs["batch"][0].sequences, runs["sequence"][0].sequences)
    sparse = [r for r in runs["batch"][1] if r.kind == "sparse"]
    assert any(r.extra["mlp_capacity"] < r.capacity for r in sparse)
    assert all("mlp_capacity" not in r.extra for r in runs["sequence"][1])


def test_batch_wide_overflow_is_counted():
    """A fixed capacity of one row per sequence keeps B rows for the whole batch's MLP: the
    rows wanted beyond them are reported as overflow."""
    model, tok = _sharpened_llada(), tiny_tokenizer()
    tm = dyllm_fx.transform(
        model, policy="dyllm", tau=0.999, capacity=1, mlp_selection="batch", overflow="approximate"
    )
    kw = dict(gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)
    dyllm_fx.generate(tm, tok, ["rev:abcdefg=", "kv:a1?a="], **kw)
    sparse = [r for r in tm.engine.records if r.kind == "sparse"]
    assert sparse and all(r.extra["mlp_capacity"] == 1 for r in sparse)
    assert all(max(r.active) <= 2 for r in sparse)  # both kept rows may fall in one sequence
    assert sum(r.overflow for r in sparse) > 0


FLAT = dict(mlp_selection="batch", kv_selection="batch")


@pytest.mark.parametrize("policy", ["dyllm", "dual_cache+dyllm"])
def test_flat_selection_gives_the_per_sequence_tokens(policy):
    """With no overflow, one flat selection per layer (the MLP and the next layer's K/V rows
    picked over the whole batch, each row attending to its own sequence's keys) decodes the
    per-sequence selection's tokens on left-padded prompts of different lengths, at a smaller
    capacity per sequence."""
    model, tok = _sharpened_llada(), tiny_tokenizer()
    prompts = ["rev:abcdefg=", "kv:a1?a=", "sort:dcba=", "add:12+34="]
    kw = dict(gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)
    runs = {}
    for name, config in (("sequence", {}), ("flat", FLAT)):
        tm = dyllm_fx.transform(model, policy=policy, tau=0.8, **config)
        runs[name] = (dyllm_fx.generate(tm, tok, prompts, **kw), tm.engine.records)
    for _, records in runs.values():
        assert sum(r.overflow for r in records) == 0
    assert torch.equal(runs["flat"][0].sequences, runs["sequence"][0].sequences)
    flat = [r.capacity for r in runs["flat"][1] if r.kind == "sparse"]
    per_sequence = [r.capacity for r in runs["sequence"][1] if r.kind == "sparse"]
    assert len(flat) == len(per_sequence) and sum(flat) < sum(per_sequence)


def test_flat_rows_lay_their_values_out_per_sequence_over_the_span():
    rows = torch.tensor([[5, 6, 7], [3, 4, 5]])  # B = 2 spans of width 3
    key = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.0, 0.7]])
    flat = FlatRows.select(key, torch.ones(2, 3, dtype=torch.bool), rows, per_sequence=1)
    assert (
        flat.slots.tolist() == [[1, 3]] and flat.batch.tolist() == [[0, 1]] and flat.rows.tolist() == [[6, 3]]
    )
    laid = flat.per_sequence(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 2, 3)  # (N, 2) -> (B, W, 2)
    expected = torch.zeros(2, 3, 2)
    expected[0, 1], expected[1, 0] = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    assert torch.equal(laid, expected)
    assert flat.per_sequence(torch.tensor([True, False]), 2, 3).tolist() == [[False, True, False]] + [
        [False] * 3
    ]


def test_flat_selection_counts_overflow_and_sizes_from_the_batch_mean():
    model, tok = _sharpened_llada(), tiny_tokenizer()
    tm = dyllm_fx.transform(model, policy="dyllm", tau=0.999, capacity=1, overflow="approximate", **FLAT)
    kw = dict(gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)
    dyllm_fx.generate(tm, tok, ["rev:abcdefg=", "kv:a1?a="], **kw)
    sparse = [r for r in tm.engine.records if r.kind == "sparse"]
    assert sparse and all(r.capacity == 1 for r in sparse)
    assert sum(r.overflow for r in sparse) > 0
    policy = DyLLMPolicy(**FLAT)
    for step in range(4):
        policy.plan(_batch_host(step))
    first = policy.plan(_batch_host(4))
    assert first.key.flat and is_flat_key(first.key)
    assert first.key.capacity == first.key.mlp_capacity == L - PROMPT
    # layer 0 changed 3 rows over the batch of 2, layer 0's salient 9, layer 1's 4
    report = policy.observe(first, [3, 2, 0] + [9, 5, 0] + [4, 3, 0], N_LAYERS, L)
    assert report.active == [5, 3] and policy._mlp_needs == [5]
    assert policy.plan(_batch_host(5)).key.capacity == 8  # ceil(9 / 2) = 5, + 3 headroom: bucket 8
    policy.observe(policy.plan(_batch_host(6)), [1, 1, 0] * 3, N_LAYERS, L)
    # a step that committed 11 tokens in one sequence: layer 0's rows need room for them
    busy = policy.plan(_batch_host(7, committed=11))
    assert busy.key.capacity == busy.key.width  # 11 + 6 headroom: the whole span


def test_flat_selection_is_not_exported(tmp_path):
    from dyllm_fx.export import to_onnx
    from dyllm_fx.export.step_module import ExportError

    tm = dyllm_fx.transform(_sharpened_llada(), policy="dual_cache+dyllm", **FLAT)
    with pytest.raises(ExportError, match="kv_selection='sequence'"):
        to_onnx(tm, tmp_path / "x.onnx", gen_length=16, block_length=8)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(tau=0.0), ValueError, r"tau must be in \(0, 1\]"),
        (dict(tau=1.01), ValueError, "tau"),
        (dict(tau=True), TypeError, "tau must be a number"),
        (dict(tau="a"), TypeError, "tau must be a number"),
        (dict(num_full_steps=0), ValueError, "num_full_steps"),
        (dict(full_query_interval=0), ValueError, "full_query_interval"),
        (dict(capacity=0), ValueError, "capacity"),
        (dict(scope="prompt"), ValueError, "scope"),
        (dict(cached_softmax_stats=1), TypeError, "cached_softmax"),
        (dict(mlp_selection="rows"), ValueError, "mlp_selection"),
        (dict(kv_selection="batch"), ValueError, "pass mlp_selection='batch' too"),
        (dict(cached_softmax_stats=True, **FLAT), ValueError, "cached_softmax_stats"),
    ],
)
def test_bad_parameters_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        DyLLMPolicy(**kwargs)


# --- one sparse step against a reference written from the model's weights -------------------


def _reference_sparse_step(arch, ids, prev_ids, attn, pos, span, state, tau):
    """The official layer algorithm on the state a dense step left (K, V, contexts, MLP
    outputs, final hidden: updated in place): Q for the span, K/V for the rows that changed
    (layer 0: the tokens that changed; later: the previous layer's salient rows), exact
    attention for those, cached context + P[:, changed] dV for the others, salient = cos < tau."""
    start, end = span
    bsz, seq_len = ids.shape
    rows = torch.arange(start, end).expand(bsz, -1)
    real = attn[:, start:end].bool()
    changed = (ids != prev_ids)[:, start:end] & real
    bias = torch.zeros(bsz, 1, 1, seq_len).masked_fill(~attn.bool()[:, None, None, :], -math.inf)
    x = arch["embed"](ids)[:, start:end]
    for layer in range(len(arch["layers"])):
        q, k, v = ref.project(arch, layer, x, rows, pos)
        k_new, v_new = state["k"][layer].clone(), state["v"][layer].clone()
        for b in range(bsz):
            cols = start + changed[b].nonzero()[:, 0]
            k_new[b][:, cols], v_new[b][:, cols] = k[b][:, changed[b]], v[b][:, changed[b]]
        scores = q @ ref.repeat_kv(k_new, q.shape[1]).transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
        p = torch.softmax(scores, -1)  # the exact normaliser, over every key
        old = state["ctx"][layer][:, :, start:end]
        approx = old + p @ ref.repeat_kv(v_new - state["v"][layer], q.shape[1])
        exact = p @ ref.repeat_kv(v_new, q.shape[1])
        ctx = torch.where(changed[:, None, :, None], exact, approx)
        flat = lambda t: t.transpose(1, 2).flatten(2)  # noqa: E731
        cos = torch.nn.functional.cosine_similarity(flat(ctx), flat(old), dim=-1, eps=1e-8)
        salient = (cos < tau) & real
        h_mid = ref.o_proj(arch, layer, x, ctx)
        branch = torch.where(
            salient[..., None], ref.mlp(arch, layer, h_mid), state["mlp"][layer][:, start:end]
        )
        x = h_mid + branch
        state["k"][layer], state["v"][layer] = k_new, v_new
        state["ctx"][layer][:, :, start:end], state["mlp"][layer][:, start:end] = ctx, branch
        changed = salient
    state["hidden"][:, start:end] = x
    return ref.logits(arch, state["hidden"])


def _sharpened_llada():
    model = tiny_llada(seed=11, n_layers=3)
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(3.0)
    return model


@pytest.mark.parametrize("tau", [0.99, 1.0])
@pytest.mark.parametrize("full_query", [False, True], ids=["response", "whole-sequence"])
def test_a_sparse_step_equals_the_reference(full_query, tau):
    """The step against the official layer algorithm; tau = 1 follows the official test too
    (``cos < tau``; layer 0 starts from the changed tokens only, not from every row)."""
    model = _sharpened_llada()
    arch = ref.arch_modules(model)
    mask_id = model.diffusion.mask_token_id
    tm = dyllm_fx.transform(
        model,
        policy="dyllm",
        tau=tau,
        num_full_steps=1,
        capacity="full",
        full_query_interval=1 if full_query else None,
    )
    gen = torch.Generator().manual_seed(5)
    ids0 = torch.randint(3, 40, (2, 14), generator=gen)
    ids0[:, 6:] = mask_id
    attn = torch.ones_like(ids0)
    attn[1, :2] = 0  # a left-padded row
    pos = dyllm_fx.models.layers.default_position_ids(ids0, attn)
    ids1 = ids0.clone()
    ids1[0, [7, 10]] = torch.tensor([20, 21])
    ids1[1, 12] = 22
    with torch.no_grad():
        tm(ids0, attn, pos)  # the dense step
        engine = tm.engine
        state = {
            "k": [t.clone() for t in engine.cache.k],
            "v": [t.clone() for t in engine.cache.v],
            "ctx": [t.clone() for t in engine.buffers.context],
            "mlp": [t.clone() for t in engine.buffers.mlp],
            "hidden": engine.cache.hidden.clone(),
        }
        got = tm(ids1, attn, pos)
        span = (0, 14) if full_query else (6, 14)
        want = _reference_sparse_step(arch, ids1, ids0, attn, pos, span, state, tau)
    record = engine.records[-1]
    assert record.kind == "sparse" and record.overflow == 0
    assert record.extra["changed"] == 2  # layer 0: the most tokens one sequence changed
    if tau < 1:
        assert 0 < sum(record.active) < 3 * (span[1] - span[0])  # some rows salient, not all: a real test
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    # float rounding of matmuls over different row counts (at tau = 1 nearly every row runs the MLP)
    close = dict(rtol=1e-5, atol=1e-5 if tau < 1 else 2e-5)
    for layer in range(3):
        torch.testing.assert_close(engine.cache.k[layer], state["k"][layer], **close)
        torch.testing.assert_close(engine.cache.v[layer], state["v"][layer], **close)
        torch.testing.assert_close(engine.buffers.context[layer], state["ctx"][layer], **close)
        torch.testing.assert_close(engine.buffers.mlp[layer], state["mlp"][layer], **close)


def test_prompt_rows_become_salient_on_whole_sequence_steps():
    model, tok = _sharpened_llada(), tiny_tokenizer()
    tm = dyllm_fx.transform(model, policy="dyllm", tau=0.999999, capacity="full")
    tm.engine.record_activity = True
    out = dyllm_fx.generate(
        tm, tok, ["rev:abcdef="], gen_length=16, block_length=8, steps=16, progress=False, stop_at_eos=False
    )
    plen = out.prompt_length
    prompt = [r.activity[:, 0, :plen] for r in tm.engine.records]
    assert all(p.max() == 0 for p in prompt[4:7])  # response-only steps: the prompt is frozen
    assert prompt[7].min() >= 0.5 and prompt[7].max() == 1.0  # the 4th sparse step: queried, some salient
    assert prompt[11].max() == 1.0


@pytest.mark.parametrize(
    "make",
    [lambda: tiny_llada(seed=3, n_layers=3), lambda: tiny_dream(seed=4, num_hidden_layers=3)],
    ids=["llada", "dream"],
)
def test_every_row_querying_everything_equals_vanilla(make):
    model, tok = make(), tiny_tokenizer()
    prompts = ["rev:abc=", "kv:a1,b2?ab="]
    kw = dict(gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)
    want = dyllm_fx.generate(model, tok, prompts, **kw)
    tm = dyllm_fx.transform(model, policy="dyllm", every_row=True, full_query_interval=1)
    got = dyllm_fx.generate(tm, tok, prompts, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert [r.kind for r in tm.engine.records] == ["full"] * 4 + ["sparse"] * 12  # the sparse path, exact


def test_a_step_whose_need_exceeds_the_capacity_gives_the_full_capacity_logits():
    """The default (``overflow="rerun"``): a capacity never changes a token. A step with more
    changed and salient rows than its capacity of 1 runs again from the state it started from,
    and gives the logits and caches of ``capacity="full"``; ``overflow="approximate"`` keeps the
    step, approximating the overflow rows."""
    model = _sharpened_llada()
    mask_id = model.diffusion.mask_token_id
    ids0 = torch.randint(3, 40, (2, 14), generator=torch.Generator().manual_seed(5))
    ids0[:, 6:] = mask_id
    attn = torch.ones_like(ids0)
    pos = dyllm_fx.models.layers.default_position_ids(ids0, attn)
    ids1 = ids0.clone()
    ids1[0, [7, 10, 11]] = torch.tensor([20, 21, 23])
    ids1[1, [9, 12]] = torch.tensor([22, 24])
    runs = {}
    for name, args in {
        "full": dict(capacity="full"),
        "rerun": dict(capacity=1),
        "approximate": dict(capacity=1, overflow="approximate"),
    }.items():
        tm = dyllm_fx.transform(model, policy="dyllm", tau=0.99, num_full_steps=1, **args)
        with torch.no_grad():
            tm(ids0, attn, pos)
            logits = tm(ids1, attn, pos)
        runs[name] = (logits, tm.engine)
    full, rerun, approx = runs["full"], runs["rerun"], runs["approximate"]
    assert rerun[1].records[-1].extra.get("rerun") and rerun[1].records[-1].overflow == 0
    torch.testing.assert_close(rerun[0], full[0], rtol=0, atol=0)
    for layer in range(3):
        torch.testing.assert_close(rerun[1].cache.k[layer], full[1].cache.k[layer], rtol=0, atol=0)
        torch.testing.assert_close(rerun[1].buffers.mlp[layer], full[1].buffers.mlp[layer], rtol=0, atol=0)
    assert approx[1].records[-1].overflow > 0 and not torch.allclose(approx[0], full[0])
