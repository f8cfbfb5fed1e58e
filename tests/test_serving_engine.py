"""The serving engine without a server: LLM / SamplingParams, the scheduler (arrivals, block
boundaries, capacity, queue bound, cancellation, batches side by side) and the re-layout of
rows at different block offsets, checked against ``generate()`` of each prompt alone."""

from __future__ import annotations

import contextlib
import io
import random
import re
from pathlib import Path

import pytest
import torch

import dyllm_fx
from dyllm_fx.eval.synthetic_tasks import ALPHABET
from dyllm_fx.runtime.policies import make_policy
from dyllm_fx.serving import (
    LLM,
    PromptTooLongError,
    QueueFull,
    RequestTooLarge,
    SamplingParams,
    ServingEngine,
)
from dyllm_fx.serving.chat import render_chat
from dyllm_fx.serving.params import resolve
from policy_helpers import fresh, tiny_models, tiny_programs
from tiny_checkpoints import tiny_tokenizer

TOK = tiny_tokenizer()
MAX_STEPS = 5000  # every stepping loop below is bounded


def prompts(n: int, seed: int = 0, low: int = 4, high: int = 30) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(ALPHABET, k=rng.randint(low, high))) for _ in range(n)]


def model_for(arch: str, policy: str = "vanilla", **params):
    if policy == "vanilla":
        return tiny_models()[arch]
    return fresh(tiny_programs(), arch, make_policy(policy, **params))


def alone(model, prompt: str, sp: SamplingParams, seed: int | None = None) -> list[int]:
    """The response ids of ``generate()`` of ``prompt`` alone, cut as the server cuts them."""
    r = resolve(sp, None, None)
    kw = sp.sampler_kwargs(bool(model.diffusion.logits_shift))
    kw = {k: v for k, v in kw.items() if v is not None}
    steps = None if sp.threshold is not None else (sp.steps or r.window)
    out = dyllm_fx.generate(
        model,
        TOK,
        [prompt],
        gen_length=r.window,
        block_length=r.block_length,
        steps=steps,
        threshold=sp.threshold,
        seed=seed if seed is not None else sp.seed,
        **kw,
    )
    ids = out.responses[0].tolist()
    eos = set(model.diffusion.eos_token_ids)
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return ids[: min(cut, r.max_tokens)]


def run(engine: ServingEngine, limit: int = MAX_STEPS) -> dict:
    final = {}
    for _ in range(limit):
        if not engine.has_unfinished():
            return final
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    raise AssertionError("the engine did not finish within the step bound")


# --- equality with generate() alone ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("policy", ["vanilla", "dense", "dual_cache", "prefix_cache"])
def test_batched_rows_equal_each_prompt_alone(arch, policy):
    """Ragged prompts, two window lengths, fewer slots than requests: rows join and leave at
    block boundaries (re-layouts), and every row commits what it commits alone."""
    model = model_for(arch, policy)
    texts = prompts(6, seed=1)
    params = [SamplingParams(max_tokens=16 if i % 2 else 32, block_length=8) for i in range(len(texts))]
    llm = LLM(model, tokenizer=TOK, max_num_seqs=3)
    outs = llm.generate(texts, params)
    assert any(o.metrics.relayouts for o in outs)  # rows joined running batches
    for text, sp, out in zip(texts, params, outs):
        assert out.finished and out.outputs[0].finish_reason in ("stop", "length")
        assert out.outputs[0].token_ids == alone(model, text, sp), text
        assert out.metrics.nfe > 0 and 0 < out.metrics.active_fraction <= 1


def test_late_request_joins_at_the_next_block_boundary():
    model = model_for("llada", "dual_cache")
    engine = ServingEngine(model, TOK, max_num_seqs=4)
    sp = SamplingParams(max_tokens=32, block_length=8)
    first = engine.add_request(prompts(1, 2)[0], sp)
    for _ in range(3):  # mid-way through the first block
        engine.step()
    late = engine.add_request(prompts(1, 3)[0], SamplingParams(max_tokens=16, block_length=8))
    batch = engine.scheduler.batches[0]
    for _ in range(100):
        engine.step()
        if late.seqs[0] in batch.rows:
            break
    assert first.seqs[0].blocks_done == 1  # it joined when the first block ended
    assert batch.decoder.step_in_block == 1 and batch.relayouts == 1 and len(engine.scheduler.batches) == 1
    final = run(engine)
    assert final[first.request_id].outputs[0].token_ids == alone(model, first.prompt, sp)
    assert final[late.request_id].outputs[0].token_ids == alone(model, late.prompt, late.params)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_seeded_sampling_equals_alone_whatever_shares_the_batch(arch):
    model = model_for(arch)
    extra = {"top_p": 0.9} if arch == "dream" else {}
    texts = prompts(4, seed=4)
    seeded = SamplingParams(max_tokens=16, block_length=8, temperature=0.8, seed=7, **extra)
    noisy = SamplingParams(max_tokens=16, block_length=8, temperature=1.0, **extra)  # unseeded neighbours
    outs = LLM(model, tokenizer=TOK).generate(texts, [seeded, noisy, seeded.clone(seed=11), noisy])
    assert outs[0].outputs[0].token_ids == alone(model, texts[0], seeded)
    assert outs[2].outputs[0].token_ids == alone(model, texts[2], seeded.clone(seed=11))


def test_n_completions_use_seed_plus_index():
    model = model_for("llada")
    sp = SamplingParams(max_tokens=16, block_length=8, temperature=0.9, seed=3, n=3)
    (out,) = LLM(model, tokenizer=TOK).generate(prompts(1, 5), sp)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert c.token_ids == alone(model, out.prompt, sp.clone(n=1), seed=3 + c.index)


def test_threshold_decoding_equals_alone():
    model = model_for("llada", "dual_cache")
    texts = prompts(4, seed=6)
    params = [SamplingParams(max_tokens=16, block_length=8, threshold=t) for t in (0.3, 0.6, 0.9, 0.6)]
    outs = LLM(model, tokenizer=TOK, max_num_seqs=2).generate(texts, params)
    for text, sp, out in zip(texts, params, outs):
        assert out.outputs[0].token_ids == alone(model, text, sp)


def test_dyllm_keeping_every_row_equals_vanilla_across_relayouts():
    """DyLLM recomputing every row (``every_row``) with every step querying everything is the
    vanilla forward; re-layouts (cold steps that keep its step count) must not change that."""
    model = model_for("llada", "dyllm", every_row=True, full_query_interval=1, num_full_steps=2)
    texts = prompts(5, seed=8)
    sp = SamplingParams(max_tokens=16, block_length=8)
    outs = LLM(model, tokenizer=TOK, max_num_seqs=2).generate(texts, sp)
    assert any(o.metrics.relayouts for o in outs)
    vanilla = model_for("llada")
    for text, out in zip(texts, outs):
        assert out.outputs[0].token_ids == alone(vanilla, text, sp)


@pytest.mark.parametrize("policy", ["dyllm", "dual_cache+dyllm", "es_dllm", "dllm_cache"])
def test_approximate_policies_serve_ragged_arrivals(policy):
    """Every policy decodes rows that join at block boundaries (tokens are approximate there,
    so only completion is checked), with fewer than every row active for the row policies."""
    model = model_for("llada", policy)
    outs = LLM(model, tokenizer=TOK, max_num_seqs=2).generate(
        prompts(4, seed=9), SamplingParams(max_tokens=16, block_length=8)
    )
    assert all(o.finished and o.outputs[0].finish_reason in ("stop", "length") for o in outs)
    assert any(o.metrics.relayouts for o in outs)


# --- the engine's re-layout flag -----------------------------------------------------------------


def _engine_step(model, ids, relayout=False, block=(8, 16)):
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    out = model.engine.step(
        ids,
        None,
        pos,
        torch.arange(*block).expand(ids.shape[0], -1),
        step=0,
        block_start=block[0],
        block_end=block[1],
        response_start=8,
        mask_token_id=model.diffusion.mask_token_id,
        logits_shift=0,
        relayout=relayout,
    )
    assert out.logits.shape[:2] == (ids.shape[0], block[1] - block[0])
    return model.engine.records[-1].kind


def test_relayout_is_a_full_step_that_keeps_dyllms_step_count():
    model = model_for("llada", "dyllm", num_full_steps=2)
    ids = torch.randint(3, 40, (2, 24))
    ids[:, 8:] = model.diffusion.mask_token_id
    with torch.inference_mode():
        kinds = [_engine_step(model, ids) for _ in range(3)]
        assert kinds == ["full", "full", "sparse"]
        assert _engine_step(model, ids, relayout=True) == "full"  # warm cache, but the columns moved
        assert _engine_step(model, ids) == "sparse"  # no second warm-up
        model.engine.reset()  # a new generation does restart it
        assert [_engine_step(model, ids) for _ in range(3)] == ["full", "full", "sparse"]


def test_relayout_makes_a_warm_block_cache_step_full():
    model = model_for("llada", "dual_cache")
    ids = torch.randint(3, 40, (1, 24))
    ids[:, 8:] = model.diffusion.mask_token_id
    with torch.inference_mode():
        assert [_engine_step(model, ids) for _ in range(2)] == ["full", "span"]
        assert _engine_step(model, ids, relayout=True) == "full"
        assert _engine_step(model, ids) == "span"


# --- scheduling ---------------------------------------------------------------------------------


def test_incompatible_parameters_run_side_by_side():
    """A request with another block clock starts its own batch at once and, being short,
    finishes while the long one still runs."""
    engine = ServingEngine(model_for("llada"), TOK)
    long = engine.add_request(prompts(1, 10)[0], SamplingParams(max_tokens=48, block_length=8))
    for _ in range(3):
        engine.step()
    short = engine.add_request(prompts(1, 11)[0], SamplingParams(max_tokens=8, block_length=8, steps=2))
    seen_two = False
    for _ in range(MAX_STEPS):
        seen_two |= len(engine.scheduler.batches) == 2
        outs = {o.request_id: o for o in engine.step()}
        if short.request_id in outs and outs[short.request_id].finished:
            break
    assert seen_two and not long.finished
    run(engine)
    assert long.finished and long.metrics.finished_time > short.metrics.finished_time


def test_max_num_seqs_bounds_the_running_rows():
    engine = ServingEngine(model_for("llada"), TOK, max_num_seqs=2)
    reqs = [engine.add_request(p, SamplingParams(max_tokens=16, block_length=8)) for p in prompts(5, 12)]
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished():
            break
        engine.step()
        assert engine.scheduler.num_running <= 2
    assert all(r.finished for r in reqs)


def test_capacity_goes_to_requests_in_arrival_order():
    """With one slot, a request of another block clock that arrived first runs before a later
    request that could have joined the running batch."""
    engine = ServingEngine(model_for("llada"), TOK, max_num_seqs=1)
    a = engine.add_request("abc", SamplingParams(max_tokens=16, block_length=8))
    engine.step()
    b = engine.add_request("abd", SamplingParams(max_tokens=16, block_length=16))
    c = engine.add_request("abe", SamplingParams(max_tokens=16, block_length=8))
    run(engine)
    assert a.metrics.first_scheduled_time < b.metrics.first_scheduled_time < c.metrics.first_scheduled_time


def test_queue_bound_refuses_requests_beyond_it():
    engine = ServingEngine(model_for("llada"), TOK, max_num_seqs=1, max_queue_size=2)
    sp = SamplingParams(max_tokens=8, block_length=8)
    engine.add_request("ab", sp)
    engine.add_request("cd", sp)
    with pytest.raises(QueueFull, match="queue is full"):
        engine.add_request("ef", sp)
    assert engine.metrics.rejected_by_reason == {"queue_full": 1}
    run(engine)
    with pytest.raises(RequestTooLarge, match="can never be queued"):
        engine.add_request("gh", sp.clone(n=3))  # three rows never fit a queue of two: no retry helps
    assert not isinstance(RequestTooLarge("x"), QueueFull)
    engine.add_request("gh", sp)  # room again once the queue drained


def test_cancelled_requests_leave_and_the_others_are_unchanged():
    model = model_for("llada", "dual_cache")
    engine = ServingEngine(model, TOK, max_num_seqs=2)
    sp = SamplingParams(max_tokens=32, block_length=8)
    keep, gone, waiting = (engine.add_request(p, sp) for p in prompts(3, 13))
    for _ in range(3):  # mid-block
        engine.step()
    assert engine.abort(gone.request_id) and engine.abort(waiting.request_id)
    assert engine.scheduler.num_waiting == 0  # the waiting one left the queue at once
    final = run(engine)
    assert final[gone.request_id].outputs[0].finish_reason == "abort"
    assert final[waiting.request_id].outputs[0].finish_reason == "abort"
    assert final[keep.request_id].outputs[0].token_ids == alone(model, keep.prompt, sp)
    assert engine.scheduler.num_running == 0 and not engine.abort(gone.request_id)


class _RecordingMirror:
    """A tensor-parallel leader's mirror that keeps what it would send; ``during_lead`` runs
    (in another thread, as the HTTP server's) while the journal is being sent."""

    def __init__(self, during_lead=None):
        self.sent: list[tuple[list, bool]] = []
        self.during_lead = during_lead

    def lead(self, journal):
        self.sent.append((journal, True))
        if self.during_lead is not None:
            import threading

            thread = threading.Thread(target=self.during_lead)
            thread.start()
            thread.join(0.3)  # it waits for the engine's lock: the step's batch is being decided

    def heartbeat(self, journal):
        if journal:
            self.sent.append((journal, False))


def test_a_leader_steps_only_what_it_sent_its_followers():
    """A request arriving while a tensor-parallel leader sends its journal joins no batch before
    the next journal carries it, and a cancellation takes effect at the next step boundary (the
    followers apply both there; a step that differed between ranks would break their collectives)."""
    engine = ServingEngine(model_for("llada", "dual_cache"), TOK, max_num_seqs=4)
    sp = SamplingParams(max_tokens=16, block_length=8)
    late = []
    engine.mirror = _RecordingMirror(lambda: late.append(engine.add_request(prompts(1, 3)[0], sp)))
    first = engine.add_request(prompts(1, 2)[0], sp)
    engine.step()
    assert len(late) == 1 and [kind for kind, _ in engine.mirror.sent[0][0]] == ["add"]
    scheduled = {id(s) for b in engine.scheduler.batches for s in b.rows}
    assert all(id(s) not in scheduled for s in late[0].seqs)  # it waits for the next step
    engine.mirror.during_lead = None
    assert engine.abort(first.request_id)
    assert not first.seqs[0].cancelled  # not in the middle of a step: at the next boundary
    outputs = engine.step()
    assert engine.mirror.sent[1][0] == [("add", engine.mirror.sent[1][0][0][1]), ("abort", first.request_id)]
    assert first.seqs[0].cancelled
    assert [o.outputs[0].finish_reason for o in outputs if o.request_id == first.request_id] == ["abort"]


def test_a_failing_step_ends_its_batch_only():
    engine = ServingEngine(model_for("llada"), TOK)
    bad = engine.add_request("abc", SamplingParams(max_tokens=8, block_length=8))
    engine.step()
    batch = engine.scheduler.batches[0]

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    batch.stepper = type("Broken", (), {"__call__": staticmethod(broken)})()
    outs = engine.step()
    assert (
        outs
        and outs[0].outputs[0].finish_reason == "error"
        and "device lost" in outs[0].outputs[0].stop_reason
    )
    good = engine.add_request("abc", SamplingParams(max_tokens=8, block_length=8))
    assert run(engine)[good.request_id].outputs[0].finish_reason in ("stop", "length")
    assert bad.finished


def test_an_engine_that_cannot_go_on_answers_every_request_and_refuses_new_ones():
    """A fault outside a batch's step (a lost tensor-parallel rank) stops the engine thread: the
    waiting calls get an error answer, never silence, and new calls an EngineStoppedError."""
    import asyncio

    from dyllm_fx.errors import EngineStoppedError
    from dyllm_fx.serving.async_engine import AsyncEngine

    engine = ServingEngine(model_for("llada"), TOK)

    def lost(*args, **kwargs):
        raise RuntimeError("rank 1 is gone")

    engine.step = lost
    running = AsyncEngine(engine).start()

    async def call():
        request = engine.make_request("abc", SamplingParams(max_tokens=8, block_length=8))
        return await running.submit([request]).next(timeout=30)

    out = asyncio.run(call())
    assert out.finished and out.outputs[0].finish_reason == "error"
    assert "rank 1 is gone" in out.outputs[0].stop_reason
    with pytest.raises(EngineStoppedError, match="restart the server"):
        asyncio.run(call())
    running.shutdown()


# --- outputs ------------------------------------------------------------------------------------


def test_max_tokens_cuts_a_rounded_window_and_stop_strings_cut_the_text():
    model = model_for("llada")
    llm = LLM(model, tokenizer=TOK)
    text = "q" + ALPHABET[:20]
    base = SamplingParams(max_tokens=64, block_length=8)
    ids = alone(model, text, base)
    (cut,) = llm.generate(text, base.clone(max_tokens=5))  # a 8-token window, 5 tokens returned
    assert cut.outputs[0].token_ids == alone(model, text, base.clone(max_tokens=5))
    assert len(cut.outputs[0].token_ids) <= 5
    full = llm.generate(text, base)[0].outputs[0]
    assert full.token_ids == ids
    assert len(full.text) >= 4, "pick a prompt whose response has a few characters"
    stop = full.text[2:4]
    out = llm.generate(text, base.clone(stop=[stop, "never"]))[0].outputs[0]
    assert out.text == full.text[: full.text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert TOK.decode(out.token_ids) == out.text


def test_chat_uses_the_trivial_template_without_a_chat_template():
    llm = LLM(model_for("llada"), tokenizer=TOK)
    sp = SamplingParams(max_tokens=8, block_length=8)
    messages = [
        {"role": "system", "content": "ab"},
        {"role": "user", "content": [{"type": "text", "text": "cd"}]},
    ]
    assert render_chat(TOK, messages) == "abcd"
    assert llm.chat(messages, sp)[0].outputs[0].token_ids == llm.generate("abcd", sp)[0].outputs[0].token_ids


def test_chat_uses_the_tokenizers_template():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }},{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    assert render_chat(tok, [{"role": "user", "content": "xy"}]) == "u:xy,a:"


def test_parameters_are_checked_with_the_fix():
    llm = LLM(model_for("llada"), tokenizer=TOK)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(TypeError, match="max_tokens"):
        SamplingParams(max_tokens=2.5)
    with pytest.raises(ValueError, match="top_p / top_k apply to Dream"):
        llm.generate("ab", SamplingParams(top_p=0.5))
    with pytest.raises(ValueError, match="steps=3 must be a positive multiple"):
        llm.generate("ab", SamplingParams(max_tokens=16, block_length=8, steps=3))
    with pytest.raises(PromptTooLongError, match="exceeds the model's window of 128"):
        llm.generate("a" * 120, SamplingParams(max_tokens=16, block_length=8))
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        llm.generate("a", SamplingParams(max_tokens=500))
    with pytest.raises(ValueError, match="empty"):
        llm.generate("")


@pytest.mark.slow
def test_llm_on_the_embedded_model_matches_generate():
    torch.manual_seed(0)
    llm = LLM("default", policy="dual_cache")
    prompt = "shift:helloworldthisisdyllmfxdemoabcde="
    (out,) = llm.generate([prompt])
    assert out.outputs[0].text == dyllm_fx.generate(llm.model, llm.tokenizer, [prompt]).texts[0]
    assert out.metrics.nfe > 0 and out.metrics.active_fraction < 1.0 and out.metrics.latency > 0


def docs_block(marker: str) -> str:
    """The python block of docs/serving.md that contains ``marker``."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "serving.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    return next(b for b in blocks if marker in b)


@pytest.mark.slow
def test_docs_llm_example_runs_as_written():
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(docs_block("LLM("), "docs/serving.md", "exec"), namespace)
    outs, chat = namespace["outs"], namespace["chat"]
    assert len(outs) == 2 and all(o.finished and o.outputs[0].text for o in outs)
    assert chat[0].outputs[0].text == outs[1].outputs[0].text  # the trivial template: the same prompt
    assert printed.getvalue().strip()


def test_metrics_render_prometheus_text():
    engine = ServingEngine(model_for("llada"), TOK)
    engine.add_request("abc", SamplingParams(max_tokens=8, block_length=8))
    run(engine)
    text = engine.metrics.render(0, 0, 0, "tiny", "vanilla")
    names = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }
    for name in (
        "dyllm_requests_total",
        "dyllm_tokens_per_second",
        "dyllm_num_requests_waiting",
        "dyllm_active_fraction",
        "dyllm_request_nfe_count",
        "dyllm_request_latency_seconds_bucket",
    ):
        assert name in names, name
    assert "dyllm_request_nfe_count 1" in text and "# TYPE dyllm_request_nfe histogram" in text
