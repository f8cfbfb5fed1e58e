"""Recorded denoising schedules and their replay on another model (not a benchmark itself).

:func:`record` runs one real generation and keeps, for every step the engine ran, its inputs
(the canvas, masks, positions, logit rows), the host information the loop gave it (block,
commits, ...), the plan key it ran, whether it ran again (DyLLM's overflow), the rows each
layer recomputed (``StepRecord.active``) and, for DyLLM, each layer's context cosines: what
decides which rows are salient.

:func:`replayer` turns a policy of the same method and parameters into a replay policy for one
schedule: each step runs the recorded plan key (and its recorded rerun), and DyLLM's layers
read the recorded cosines instead of their own, so the salient rows of every layer, the
selections, the counts and the capacities they size are the recorded ones, on a model whose
own contexts mean nothing (random weights). ES-dLLM's kept rows and dLLM-Cache's refreshed
rows are top-k selections whose number the plan key fixes; which rows they are does not change
a step's cost, so the replay keeps the model's own choice of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace

import torch

import dyllm_fx
from dyllm_fx.eval.methods_bench import sampler_params
from dyllm_fx.runtime.policies import Plan, Policy, make_policy
from dyllm_fx.runtime.policies.dyllm import DyLLMBuffers, DyLLMPolicy
from dyllm_fx.runtime.policies.presets import family_of
from dyllm_fx.runtime.rows import take


@dataclass
class RecordedStep:
    """One engine step of a real generation (tensors on the CPU)."""

    args: tuple  # input_ids, attention_mask (or None), position_ids, logit_positions
    extras: tuple[torch.Tensor, ...]
    host: dict  # the HostState fields the loop gave
    planned: object  # the plan key the policy chose
    key: object  # the plan key the step ran (after a rerun, the rerun's)
    rerun: bool
    active: list[int]  # per layer: rows that ran the MLP, most of any batch element
    cosine: torch.Tensor | None  # DyLLM sparse steps: (n_layers, B, L) context cosines, NaN unmeasured

    @property
    def input_ids(self) -> torch.Tensor:
        return self.args[0]


@dataclass
class Schedule:
    """Every step of one generation of ``method`` (``policy`` with ``config``)."""

    method: str
    policy: str
    config: dict
    family: str | None
    threshold: float | None
    steps: list[RecordedStep] = field(default_factory=list)
    gen_length: int = 0

    @property
    def batch(self) -> int:
        return self.steps[0].input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.steps[0].input_ids.shape[1]

    def commits(self, mask_id: int) -> list[int]:
        """Tokens each step committed (most of any batch element): the masks it turned into
        tokens, read from the next step's canvas (the last step's from the step count left)."""
        out = []
        for now, nxt in zip(self.steps, self.steps[1:]):
            done = (now.input_ids == mask_id) & (nxt.input_ids != mask_id)
            out.append(int(done.sum(1).max()))
        if self.steps:
            left = int((self.steps[-1].input_ids[:, -self.gen_length :] == mask_id).sum(1).max())
            out.append(left)
        return out

    def summary(self, mask_id: int) -> dict:
        """The plan as JSON: per step its key, rerun, per-layer rows and commits."""
        return {
            "method": self.method,
            "threshold": self.threshold,
            "batch": self.batch,
            "seq_len": self.seq_len,
            "steps": [
                {"key": s.key.to_json(), "rerun": s.rerun, "active": s.active, "commits": c}
                for s, c in zip(self.steps, self.commits(mask_id))
            ],
        }


def record(
    fast, tokenizer, prompts: list[str], method: str, policy: str, config: dict, threshold, gen: dict
) -> Schedule:
    """One generation of ``prompts`` (one batch) by ``fast`` (a transformed embedded model,
    eager) under ``policy`` (``"vanilla"``: the dense policy, which runs the model as it is),
    with every step recorded. The policy replaces ``fast``'s (one trace serves every method)."""
    spec = fast.diffusion
    engine = fast.engine
    engine.policy = make_policy(_policy_name(policy), family=family_of(spec), **config)
    dyllm = isinstance(engine.policy, DyLLMPolicy)
    engine.record_similarity = dyllm  # the cosines that decide DyLLM's salient rows
    schedule = Schedule(
        method, policy, dict(config), family_of(spec), threshold, gen_length=gen["gen_length"]
    )
    run_step, choose = engine.step, engine.policy.plan
    planned = []

    def recording_plan(host):
        planned.append(choose(host))
        return planned[-1]

    def recording_step(input_ids, attention_mask, position_ids, logit_positions, extras=(), **host):
        out = run_step(input_ids, attention_mask, position_ids, logit_positions, extras, **host)
        rec = engine.records[-1]
        cosine = None
        if dyllm and rec.kind == "sparse":
            cosine = torch.stack(
                [torch.full_like(rec.similarity[0], float("nan")) if c is None else c for c in rec.similarity]
            )
        args = (input_ids, attention_mask, position_ids, logit_positions)
        schedule.steps.append(
            RecordedStep(
                tuple(None if t is None else t.detach().cpu().clone() for t in args),
                tuple(t.detach().cpu().clone() for t in extras),
                dict(host),
                _plain_key(planned[-1].key),
                _plain_key(rec.key),
                bool(rec.extra.get("rerun", False)),
                list(rec.active),
                cosine,
            )
        )
        return out

    engine.step, engine.policy.plan = recording_step, recording_plan
    try:
        dyllm_fx.generate(
            fast,
            tokenizer,
            prompts,
            threshold=threshold,
            progress=False,
            **gen,
            **sampler_params(fast, _Threshold(threshold)),
        )
    finally:
        del engine.step  # the class's own again
        engine.record_similarity = False
    return schedule


def _policy_name(policy: str) -> str:
    return "dense" if policy == "vanilla" else policy


@dataclass(frozen=True)
class _Threshold:
    threshold: float | None  # what sampler_params reads of a bench method


def _plain_key(key):
    """``key`` without DyLLM's similarity-recording flag (the replay does not record)."""
    return replace(key, record=False) if "record" in {f.name for f in fields(key)} else key


# --- the replay policy ------------------------------------------------------------------------


class ForcedPlan:
    """Mixin: each step runs the next recorded plan key, and runs again when the recording did.
    The policy's own plan still runs first (its counters, spans and host bookkeeping); where its
    key differs from the recording's, the recording's wins and ``drift`` counts it."""

    def load(self, schedule: Schedule) -> None:
        self._replay = list(schedule.steps)
        self._next = 0
        self.drift = 0

    def plan(self, host) -> Plan:
        own = super().plan(host)
        step = self._replay[self._next]
        self._next += 1
        self._current = step
        forced = getattr(self, "_forced", None)
        if forced is not None and step.cosine is not None:
            forced.copy_(step.cosine.to(forced.device))
        if own.key == step.planned:
            return own
        self.drift += 1
        return Plan(step.planned, own.rows, own.span_start, own.span_len, note=own.note)

    def may_rerun(self, plan) -> bool:
        # the policy's own answer too: the engine copies the state before every step that may
        # rerun, and that copy is part of the method's cost
        return super().may_rerun(plan) or self._current.rerun

    def rerun(self, plan, counts):
        if not self._current.rerun:
            return None
        return super().rerun(plan, counts) or _full_width(plan)


def _full_width(plan: Plan) -> Plan:
    """DyLLM's rerun plan: the same step at the whole span's capacity (the policy's own
    ``rerun`` answers None when the replayed counts show no overflow)."""
    width, key = plan.note["width"], plan.key
    full = replace(key, capacity=width, mlp_capacity=None if key.mlp_capacity is None else width)
    return Plan(full, plan.rows, plan.span_start, plan.span_len, note=plan.note)


@dataclass
class ReplayBuffers(DyLLMBuffers):
    forced: torch.Tensor | None = None  # (n_layers, B, L) the recorded cosines of this step


class ForcedCosine:
    """Mixin for DyLLM: every layer's context cosines are the recorded ones (its own context
    is still computed, at the same cost), so salience, selections and counts follow the
    recording."""

    def allocate(self, program, batch, seq_len, device):
        own = super().allocate(program, batch, seq_len, device)
        forced = torch.full((len(program.attn_heads), batch, seq_len), float("nan"), device=device)
        self._forced = forced
        return ReplayBuffers(**{f.name: getattr(own, f.name) for f in fields(own)}, forced=forced)

    def _attention(self, pieces, layer, x, rows, slots, valid, q, mask, pro, cache, buffers, stats_mode):
        ctx, _ = super()._attention(
            pieces, layer, x, rows, slots, valid, q, mask, pro, cache, buffers, stats_mode
        )
        return ctx, take(buffers.forced[layer], rows, 1)

    def _flat_attention(self, pieces, layer, x, rows, flat, q, mask, pro, cache, buffers):
        ctx, _ = super()._flat_attention(pieces, layer, x, rows, flat, q, mask, pro, cache, buffers)
        return ctx, take(buffers.forced[layer], rows, 1)


def replayer(schedule: Schedule) -> Policy:
    """A policy of the schedule's method and parameters (with the recorded model's presets)
    that replays ``schedule``."""
    policy = make_policy(_policy_name(schedule.policy), family=schedule.family, **schedule.config)
    mixins = (ForcedPlan, ForcedCosine) if isinstance(policy, DyLLMPolicy) else (ForcedPlan,)
    cls = type(f"Replay{type(policy).__name__}", (*mixins, type(policy)), {})
    policy.__class__ = cls  # the same object, its parameters and presets as built
    policy.load(schedule)
    return policy


def replay(engine, schedule: Schedule, device: str) -> tuple[float, list]:
    """Every recorded step through ``engine`` (a StepEngine whose policy is
    ``replayer(schedule)``): (seconds, the engine's records)."""
    engine.policy.load(schedule)
    engine.reset()
    steps = [
        (
            tuple(None if t is None else t.to(device) for t in s.args),
            tuple(t.to(device) for t in s.extras),
            s.host,
        )
        for s in schedule.steps
    ]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        for args, extras, host in steps:
            engine.step(*args, extras, **host)
    sync()
    return time.perf_counter() - start, list(engine.records)


def drifted(schedule: Schedule, records: list) -> list[str]:
    """Where a replay's records differ from the schedule's: kinds, plan keys, per-layer rows."""
    out = []
    if len(records) != len(schedule.steps):
        return [f"{len(records)} steps replayed, {len(schedule.steps)} recorded"]
    for i, (s, r) in enumerate(zip(schedule.steps, records)):
        if r.key != s.key or r.active != s.active or bool(r.extra.get("rerun", False)) != s.rerun:
            out.append(f"step {i}: recorded {s.key} {s.active} rerun={s.rerun}, replayed {r.key} {r.active}")
    return out
