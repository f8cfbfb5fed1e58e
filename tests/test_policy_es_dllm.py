"""ES-dLLM (runtime/policies/es_dllm.py) against its official semantics: the depth layout, the
variation's normalisation, the importance with its bonuses, the kept count and its floor, the
window and refresh cadence, one skip step against a reference written from the model's
weights, and that no committed token comes from a row that skipped a layer."""

from __future__ import annotations

import pytest
import torch

import block_reference as ref
import dyllm_fx
from dyllm_fx.runtime.policies import ESDLLMPolicy, HostState, make_policy
from dyllm_fx.runtime.policies.es_dllm import importance, skip_layout, variation
from tiny_checkpoints import tiny_dream, tiny_llada, tiny_tokenizer

L, PROMPT = 24, 8


def test_official_depth_layout():
    layout = ESDLLMPolicy().proportion_steps
    assert skip_layout(layout, 32) == [(4, 0.5), (8, 0.25)]  # LLaDA-8B
    assert skip_layout(layout, 28) == [(4, 0.5), (7, 0.25)]  # Dream-7B
    assert skip_layout(layout, 8) == [(1, 0.5), (2, 0.25)]
    assert skip_layout(layout, 4) == [(1, 0.25)]  # both thresholds fall on layer 1: the last wins


def test_variation_is_normalised_as_the_official_code():
    old = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]]])  # RMS 3.5355, 0, 1
    new = torch.tensor([[[3.0, 5.0], [0.0, 0.01], [3.0, 1.0]]])
    # mean |new - old| / (RMS(old) + 1e-6): 0.5 / 3.5355, 0.005 / 1e-6 = 5000, 1.0 / 1
    raw = torch.tensor([0.5 / (12.5**0.5 + 1e-6), 0.005 / 1e-6, 1.0 / (1 + 1e-6)])
    torch.testing.assert_close(variation(new, old)[0], raw / 5000.0)  # divided by max(max, 1)
    small = variation(new[:, [0]], old[:, [0]])  # a largest value below 1 is not stretched
    torch.testing.assert_close(small[0], raw[:1])


def test_importance_adds_the_bonuses():
    conf = torch.tensor([[0.9, 0.0, 0.8, 0.3, 0.0]])
    change = torch.tensor([[0.0, 1.0, 0.5, 0.0, 0.2]])
    live = torch.tensor([[True, True, True, True, False]])
    bonus = torch.tensor([[0.0, 5.0, 0.0, 3.0, 0.0]])  # leftmost mask, just decoded
    score = importance(conf, change, 0.5, live, bonus)
    # 0.5 conf + 0.5 change; +2 on the two most confident live rows (0 and 2)
    torch.testing.assert_close(score, torch.tensor([[0.45 + 2, 0.5 + 5, 0.65 + 2, 0.15 + 3, 0.1]]))
    assert (
        importance(conf, change, 0.0, live, 0 * bonus).tolist() == change.tolist()
    )  # no top-2 bonus at alpha 0


def _host(step, block, cold=None, committed=1, leftmost=None, shift=0, layers=8):
    ids = torch.zeros(1, L, dtype=torch.long)
    return HostState(
        ids,
        torch.ones_like(ids),
        step == 0 if cold is None else cold,
        layers,
        step=step,
        block_start=block[0],
        block_end=block[1],
        response_start=PROMPT,
        mask_token_id=1,
        logits_shift=shift,
        last_committed=committed,
        last_leftmost=leftmost,
    )


def _plans(policy, steps, shift=0, committed=1):
    out = []
    for step in range(steps):
        block = (8, 16) if step < 8 else (16, 24)
        plan = policy.plan(
            _host(step, block, committed=committed, leftmost=(13,) if step == 8 else None, shift=shift)
        )
        span = (int(plan.span_start[0]), int(plan.span_len[0])) if plan.span_start is not None else None
        out.append((plan.kind, span, plan.key.selections if plan.kind == "skip" else None))
    return out


def test_refresh_cadence_and_window():
    plans = _plans(ESDLLMPolicy(block_update_freq=3, prompt_update_freq=100), 12)
    kinds = [k for k, _, _ in plans]
    assert kinds == [
        "full",
        "skip",
        "skip",
        "refresh",
        "skip",
        "skip",
        "refresh",
        "skip",
        "skip",
        "refresh",
        "skip",
        "skip",
    ]
    assert plans[1][1] == (8, 8) and plans[3][1] == (8, 8)  # the block, with and without skipping
    assert plans[8][1] == (13, 11)  # a block's first step starts at the leftmost row decoded last
    assert plans[9][1] == (16, 8)
    prompt = _plans(ESDLLMPolicy(block_update_freq=100, prompt_update_freq=4), 9)
    assert prompt[4][:2] == ("refresh", (0, 16)) and prompt[8][:2] == ("refresh", (0, 24))  # [0, block end)


def test_kept_counts_take_the_official_floor():
    # window 8; layout (1, 0.5), (2, 0.25); floor min(last_decode_cnt + 2, block length 8)
    assert _plans(ESDLLMPolicy(), 2)[1][2] == ((1, 4), (2, 3))  # max(4, 3), max(2, 3)
    assert _plans(ESDLLMPolicy(), 2, committed=5)[1][2] == ((1, 7),)  # max(4, 7); then 7 again: no selection
    assert _plans(ESDLLMPolicy(), 2, committed=7)[1][2] == ()  # the floor keeps every row


def test_dream_windows_are_the_logit_rows():
    plans = _plans(ESDLLMPolicy(), 2, shift=1)
    assert plans[1][1] == (7, 8)  # rows 7..14 predict the tokens of the block 8..15
    policy = ESDLLMPolicy()
    policy._mask_id, policy._shift = 1, 1
    ids = torch.tensor([[5, 1, 1, 6, 1]])
    assert policy._masked_rows(ids).tolist() == [[1.0, 1.0, 0.0, 1.0, 0.0]]  # row p: is token p + 1 masked


def test_presets_per_model():
    assert make_policy("es_dllm", family="llada").block_update_freq == 16
    assert make_policy("es_dllm", family="dream").block_update_freq == 8
    assert make_policy("es_dllm", family="dream", block_update_freq=4).block_update_freq == 4  # the user wins
    assert (
        make_policy("dyllm", family="dream").tau == 0.995 and make_policy("dyllm", family="llada").tau == 0.99
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=2.0), "alpha"),
        (dict(variation="attention"), "variation"),
        (dict(skip_layers=(3, 1), keep=0.5), "increasing"),
        (dict(skip_layers=(1,), keep=(0.5, 0.2)), "one value per skip layer"),
        (dict(skip_layers=(1,)), "together"),
        (dict(keep=0.0, skip_layers=(1,)), "keep"),
        (dict(proportion_steps=((0.5, 0.1),)), "start with"),
        (dict(block_update_freq=0), "block_update_freq"),
    ],
)
def test_bad_parameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ESDLLMPolicy(**kwargs)


# --- one skip step against a reference written from the model's weights ---------------------


def _model(n_layers=4):
    model = tiny_llada(seed=13, n_layers=n_layers)
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(3.0)
    return model


def test_a_skip_step_equals_the_reference():
    """Hidden-state variation, explicit layout: every window row runs layers 0-1, the kept rows
    (importance with the bonuses, the floor) run layers 2-3; only they get logits, and only
    their snapshot rows move."""
    model = _model()
    arch = ref.arch_modules(model)
    mask_id = model.diffusion.mask_token_id
    policy = ESDLLMPolicy(skip_layers=(1,), keep=0.5, block_update_freq=100, prompt_update_freq=100)
    tm = dyllm_fx.transform(model, policy=policy)
    engine = tm.engine
    gen = torch.Generator().manual_seed(7)
    ids0 = torch.randint(3, 40, (2, 16), generator=gen)
    ids0[:, 6:] = mask_id
    ids1 = ids0.clone()
    ids1[0, 8], ids1[1, 6] = 20, 21
    pos = torch.arange(16).expand(2, -1)
    info = dict(block_start=6, block_end=14, response_start=6, mask_token_id=mask_id, logits_shift=0)
    logit_rows = torch.arange(6, 14).expand(2, -1)
    with torch.no_grad():
        engine.step(
            ids0, None, pos, logit_rows, step=0, last_committed=1, **info
        )  # full: snapshots, confidence
        state = {
            "k": [t.clone() for t in engine.cache.k],
            "v": [t.clone() for t in engine.cache.v],
            "snap": engine.buffers.snapshot[1].clone(),
            "conf": engine.buffers.confidence.clone(),
            "hidden": engine.cache.hidden.clone(),
        }
        out = engine.step(ids1, None, pos, logit_rows, step=1, last_committed=1, **info)

        # the reference: window = the block [6, 14); kept = max(int(0.5 * 8), min(1 + 2, 8)) = 4
        rows = torch.arange(6, 14).expand(2, -1)
        masked = (ids1 == mask_id).float()
        conf = state["conf"] * masked
        x = arch["embed"](ids1)[:, 6:14]
        key_mask = None
        for layer in range(4):
            q, k, v = ref.project(arch, layer, x, rows, pos)
            for b in range(2):
                state["k"][layer][b][:, rows[b]], state["v"][layer][b][:, rows[b]] = k[b], v[b]
            ctx = torch.nn.functional.scaled_dot_product_attention(
                q, state["k"][layer], state["v"][layer], attn_mask=key_mask
            )
            h_mid = ref.o_proj(arch, layer, x, ctx)
            x = h_mid + ref.mlp(arch, layer, h_mid)
            if layer == 1:
                old = state["snap"].gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
                change = (x - old).abs().mean(-1) / (old.norm(dim=-1) / x.shape[-1] ** 0.5 + 1e-6)
                change = change / change.amax(-1, keepdim=True).clamp_min(1.0)
                c = conf.gather(1, rows)
                score = 0.5 * c + 0.5 * change
                for b in range(2):
                    score[b, c[b].argsort(descending=True, stable=True)[:2]] += 2.0  # top-2 confidence
                    score[b, (ids1[b, 6:14] == mask_id).nonzero()[0, 0]] += 5.0  # leftmost mask
                    decoded = ((ids0[b, 6:14] == mask_id) & (ids1[b, 6:14] != mask_id)).nonzero()[:, 0]
                    score[b, decoded] += 3.0  # decoded at the last step
                keep = score.argsort(dim=1, descending=True, stable=True)[:, :4].sort(dim=1).values
                rows, x = rows.gather(1, keep), x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
                for b in range(2):
                    state["snap"][b, rows[b]] = x[b]
        for b in range(2):
            state["hidden"][b, rows[b]] = x[b]
        want = ref.logits(arch, state["hidden"]).gather(
            1, logit_rows[..., None].expand(-1, -1, out.logits.shape[-1])
        )

    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    eligible = torch.zeros(2, 8, dtype=torch.bool)
    for b in range(2):
        eligible[b, rows[b] - 6] = True
    assert torch.equal(out.eligible, eligible) and eligible.sum(1).tolist() == [4, 4]
    torch.testing.assert_close(engine.buffers.snapshot[1], state["snap"], rtol=1e-5, atol=1e-5)
    for layer in range(4):  # skipped rows keep their old K/V in the layers after the skip
        torch.testing.assert_close(engine.cache.k[layer], state["k"][layer], rtol=1e-5, atol=1e-5)
    assert engine.records[-1].active == [8, 8, 4, 4]


def test_no_committed_token_comes_from_a_row_that_skipped_a_layer():
    model, tok = _model(), tiny_tokenizer()
    tm = dyllm_fx.transform(model, policy="es_dllm", proportion_steps=((1.0, 0.0), (0.25, 0.25)))
    make = tm.make_step_function
    seen = []

    def spying():
        step = make()

        def call(request):
            out = step(request)
            seen.append((request.input_ids.clone(), request.block_start, out.eligible))
            return out

        return call

    tm.make_step_function = spying
    out = dyllm_fx.generate(
        tm,
        tok,
        ["rev:abcdef=", "kv:a1?a="],
        gen_length=16,
        block_length=8,
        steps=16,
        progress=False,
        stop_at_eos=False,
    )
    after = [ids for ids, _, _ in seen[1:]] + [out.sequences]
    restricted = 0
    for (ids, start, eligible), nxt in zip(seen, after):
        committed = (nxt != ids)[:, start : start + 8]
        if eligible is not None:
            restricted += int((~eligible).sum())
            assert not (committed & ~eligible).any()
    assert restricted > 0  # rows were withheld: the check had something to check


@pytest.mark.parametrize(
    "make",
    [lambda: tiny_llada(seed=3, n_layers=3), lambda: tiny_dream(seed=4, num_hidden_layers=3)],
    ids=["llada", "dream"],
)
def test_keeping_every_row_equals_vanilla(make):
    model, tok = make(), tiny_tokenizer()
    prompts = ["rev:abc=", "kv:a1,b2?ab="]
    kw = dict(gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)
    want = dyllm_fx.generate(model, tok, prompts, **kw)
    tm = dyllm_fx.transform(
        model, policy="es_dllm", proportion_steps=((1.0, 0.0),), scope="all", delay_eos=False
    )
    got = dyllm_fx.generate(tm, tok, prompts, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert "skip" in {r.kind for r in tm.engine.records}


@pytest.mark.slow
@pytest.mark.parametrize("variation_kind", ["key", "value", "query"])
def test_qkv_variations_score_before_the_skip_layers_attention(variation_kind):
    """Scored before the attention: the skip layer itself runs only the kept rows."""
    model, tok = _model(), tiny_tokenizer()
    tm = dyllm_fx.transform(
        model,
        policy="es_dllm",
        variation=variation_kind,
        skip_layers=(1,),
        keep=0.5,
        block_update_freq=100,
        prompt_update_freq=100,
    )
    dyllm_fx.generate(
        tm, tok, ["rev:abcdef="], gen_length=16, block_length=8, steps=16, progress=False, stop_at_eos=False
    )
    skip = [r for r in tm.engine.records if r.kind == "skip"]
    assert skip and all(r.active[0] > r.active[1] == r.active[2] == r.active[3] for r in skip)
    assert [8, 4, 4, 4] in [r.active for r in skip]


@pytest.mark.slow
def test_a_generation_does_not_depend_on_the_previous_one():
    """The engine reuses its buffers between generations of one shape: the confidences of the
    last generation's rows must not survive into the next (they steer the kept rows)."""
    model, tok = _model(n_layers=2), tiny_tokenizer()
    kw = dict(gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)
    first, second = ["rev:abc=", "kv:a1,b2?ab="], ["kv:c3,d4?cd=", "shift:xyz="]
    tm = dyllm_fx.transform(model, policy="es_dllm")
    dyllm_fx.generate(tm, tok, first, **kw)
    again = dyllm_fx.generate(tm, tok, second, **kw)
    fresh = dyllm_fx.generate(dyllm_fx.transform(model, policy="es_dllm"), tok, second, **kw)
    assert torch.equal(again.sequences, fresh.sequences)


def test_an_early_eos_is_delayed_as_the_official_sampler():
    """``delay_eos`` (official ``delay_eos_generation``): a masked row predicting EOS while the
    response has none and its left neighbour is masked may not be committed, and LLaDA stores 0 as
    its confidence; a row whose left neighbour is decoded, or a response that has an EOS, goes on."""
    from types import SimpleNamespace

    from dyllm_fx.runtime.policies import StepOutput

    mask, eos = 1, 0
    ids = torch.tensor([[5, 6, mask, mask, mask, 7, mask], [5, 6, mask, mask, eos, 7, mask]])
    rows = torch.arange(2, 7).expand(2, -1)
    logits = torch.zeros(2, 5, 10)
    logits[:, :, 3] = 1.0
    logits[:, [0, 1, 4], eos] = 5.0  # EOS predicted at block rows 0, 1 and 4
    inp = SimpleNamespace(input_ids=ids, logit_positions=rows, block_rows=rows)
    host = HostState(ids, torch.ones_like(ids), True, 4, mask_token_id=mask, eos_token_ids=(eos,))
    for delay in (True, False):
        policy = ESDLLMPolicy(delay_eos=delay)
        policy.plan(host)
        buffers = SimpleNamespace(response=torch.arange(7).expand(2, -1) >= 2, confidence=torch.zeros(2, 7))
        masked = policy._masked_rows(ids)
        out = StepOutput(logits)
        delayed = policy._delayed_eos(inp, out, buffers, masked)
        policy._update_confidence(buffers, inp, out, masked, delayed)
        if not delay:
            assert delayed is None and (buffers.confidence[0, [2, 3, 4, 6]] > 0).all()
            continue
        # row 3 (left neighbour 2 masked) waits; row 2 follows the prompt, row 6 a decoded token
        assert delayed.tolist() == [[False, True, False, False, False], [False] * 5]
        assert buffers.confidence[0, 3] == 0 and (buffers.confidence[0, [2, 4, 6]] > 0).all()
        assert (buffers.confidence[1, [2, 3, 6]] > 0).all()  # the second response has its EOS


def test_the_snapshot_is_written_when_the_floor_keeps_every_row():
    """Official ``update_hidden_state`` runs at every skip layer at every call: when the floor
    ``min(last_decode_cnt + 2, block)`` keeps the whole window, the window's rows still get their
    new hidden state in the snapshot (threshold decoding commits many tokens at a step)."""
    model = _model()
    mask_id = model.diffusion.mask_token_id
    policy = ESDLLMPolicy(skip_layers=(1,), keep=0.5, block_update_freq=100, prompt_update_freq=100)
    engine = dyllm_fx.transform(model, policy=policy).engine
    ids0 = torch.randint(3, 40, (1, 16), generator=torch.Generator().manual_seed(3))
    ids0[:, 6:] = mask_id
    ids1 = ids0.clone()
    ids1[0, 6:12] = torch.arange(20, 26)  # six tokens committed at once: floor min(6 + 2, 8) = 8
    pos = torch.arange(16).expand(1, -1)
    info = dict(block_start=6, block_end=14, response_start=6, mask_token_id=mask_id, logits_shift=0)
    rows = torch.arange(6, 14).expand(1, -1)
    with torch.no_grad():
        engine.step(ids0, None, pos, rows, step=0, last_committed=1, **info)
        before = engine.buffers.snapshot[1].clone()
        engine.step(ids1, None, pos, rows, step=1, last_committed=6, **info)
        after = engine.buffers.snapshot[1].clone()
        assert engine.records[-1].kind == "skip" and engine.records[-1].active == [8] * 4
        # a refresh of the same window from the same state writes what the skip step must have
        engine.policy.block_update_freq = 1
        engine.step(ids1, None, pos, rows, step=1, last_committed=6, **info)
    assert not torch.allclose(after[0, 6:14], before[0, 6:14])
    torch.testing.assert_close(after, engine.buffers.snapshot[1], rtol=1e-5, atol=1e-5)
