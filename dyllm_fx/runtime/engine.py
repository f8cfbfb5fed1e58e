"""The step engine: one call per denoising step, one step function per plan.

    plan = policy.plan(host)                          host: shapes and small tensors for this step
    out = step[plan.key](inputs, cache, buffers)      device: the whole step, no host read inside
    report = policy.observe(plan, out.counts)         host: one small read, sizes the next step

A step the policy finds wanting after that read (``policy.rerun``: DyLLM's salient rows beyond the
capacity) runs again, at the plan it names, from a copy of the state the engine took before the
step (only for plans the policy says may need it, ``policy.may_rerun``), or from the runner's
checkpoint of its own state.

``step[key]`` is the policy's ``step`` run eagerly (the readable reference), compiled whole by
inductor (``compile=True``: ``torch.compile(fullgraph=True, dynamic=False)``, one graph per
plan key and input shapes), or replayed as a CUDA graph (``cuda_graphs=True``), for every
policy. The cache and the policy's buffers are allocated once per (batch, length) and updated
in place, so compiled graphs and CUDA graphs read and write the same tensors every step.

Or ``step[key]`` is a :class:`StepRunner` that keeps the state itself: an exported step graph
(an ONNX or TensorRT session is a step function that happens to be a session). The host half
(the plan, the observed counts, the records) is the same either way.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch

from ..errors import UsageError
from .cache import StepCache
from .cuda_graph import StepGraphs
from .pieces import Pieces
from .policies import HostState, Plan, PlanKey, Policy, StepInputs, StepOutput

# Graphs one plan key's step function may compile: one per input shape it meets (batch size,
# sequence length; serving meets several). Dynamo's default limit (8 per function) would fail a
# fullgraph compile past it.
RECOMPILE_LIMIT = 64


@dataclass
class StepRecord:
    """What one step computed: per layer the rows that ran the MLP (most of any batch element,
    before bucket padding), the step's selection capacity and overflow (rows that qualified
    beyond it), and, for policies that measure it, each layer's per-position cosine similarity
    of the attention context to the previous step's ((B, L) fp32 on the CPU, NaN where not
    measured; None for layers or policies that measure nothing)."""

    active: list[int] = field(default_factory=list)
    seq_len: int = 0
    kind: str = "full"
    capacity: int = 0
    overflow: int = 0
    similarity: list[torch.Tensor | None] = field(default_factory=list)
    # (n_layers, B, L) on the CPU when the engine traces rows: 1 recomputed, 0.5 attention only
    activity: torch.Tensor | None = None
    # the policy's own figures (StepReport.extra): e.g. DyLLM's changed rows, its MLP capacity
    extra: dict = field(default_factory=dict)
    # the plan key the step ran (after a rerun, the rerun's): what fixed its shapes
    key: PlanKey | None = None

    @property
    def active_fraction(self) -> float:
        return sum(self.active) / (len(self.active) * self.seq_len) if self.active else 0.0


class StepRunner(Protocol):
    """Runs a plan's step on state it keeps in its own form (e.g. an exported graph's session,
    its cache as the session's own tensors); :class:`StepEngine` plans and observes around it."""

    n_layers: int

    def prepare(self, batch: int, seq_len: int) -> bool:
        """Make the state fit a (batch, seq_len) step (allocated afresh when the size changed);
        whether it holds the previous step's results (False: this step is cold)."""
        ...

    def run(self, host: HostState, plan: Plan, inp: StepInputs) -> StepOutput:
        """One step of ``plan``; the state is marked cold while it runs (a failure leaves it
        half written) and warm once it completed."""
        ...

    def reset(self) -> None:
        """Nothing in the state is valid any more: the next step is cold."""
        ...

    def checkpoint(self) -> object:
        """A handle on the state as it is now, for :meth:`restore` (a step the policy runs
        again starts from it)."""
        ...

    def restore(self, handle: object) -> None:
        """The state as :meth:`checkpoint` found it."""
        ...


def compile_backend(compile: bool | str) -> str | None:
    """The torch.compile backend ``compile`` names: None for False, inductor for True, else the
    name itself once torch knows it (an unknown name is refused here, not at the first step)."""
    if isinstance(compile, bool):
        return "inductor" if compile else None
    if not isinstance(compile, str):
        raise TypeError(f"compile must be True, False or a torch.compile backend name, got {compile!r}")
    from torch._dynamo import list_backends

    if compile not in list_backends(exclude_tags=()):
        raise UsageError(
            f"unknown compile backend {compile!r}; use compile=True (inductor) or one of "
            f"{', '.join(list_backends())} (or a debugging backend: aot_eager, eager)"
        )
    return compile


class CompileCounter:
    """A torch.compile backend that counts the graphs it compiles (recompiles included) and
    hands them to ``backend`` ("inductor", or e.g. "aot_eager", which traces the same whole
    graph without generating code: what tests use to check a step compiles quickly)."""

    def __init__(self, backend: str = "inductor"):
        self.backend = backend
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        return lookup_backend(self.backend)(gm, example_inputs)


class StepEngine:
    """Owns the pieces, the cache, the policy's buffers and the step functions; or, given a
    ``runner`` (then ``program`` may be None), the runner owns the state and runs each step."""

    def __init__(
        self,
        program,
        policy: Policy,
        compile: bool | str = False,
        cuda_graphs: bool = False,
        runner: StepRunner | None = None,
    ):
        backend = compile_backend(compile)
        self.program = program
        self.runner = runner
        self.pieces = Pieces(program) if program is not None else None
        if program is not None:
            policy.bind(program)
        self._policy = policy
        self.compile = bool(compile)
        self.cuda_graphs = cuda_graphs
        self.cache: StepCache | None = None
        self.buffers = None
        self._buffers_for: tuple | None = None
        self.records: list[StepRecord] = []
        # Off by default: copying similarities / row maps to the host each step costs a sync.
        self.record_similarity = False
        self.record_activity = False
        self.compiler = CompileCounter(backend or "inductor")
        self._compiled: dict[tuple, Callable] = {}
        self.graphs = StepGraphs()

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        if self.program is not None:
            policy.bind(self.program)
        self._policy = policy
        self._compiled.clear()
        self.graphs.clear()
        self.reset()

    @property
    def n_layers(self) -> int:
        return self.runner.n_layers if self.runner is not None else self.pieces.n_layers

    def predicted_nbytes(self, batch: int, seq_len: int) -> int:
        """Bytes the caches of a (batch, seq_len) generation take under the current policy."""
        return StepCache.predicted_nbytes(self.program, batch, seq_len) + self.policy.buffer_nbytes(
            self.program, batch, seq_len
        )

    @property
    def allocated_nbytes(self) -> int:
        if self.cache is None:
            return 0
        return self.cache.nbytes + sum(t.numel() * t.element_size() for t in _tensors(self.buffers))

    def reset(self) -> None:
        """Forget cached rows (the next step recomputes everything); keeps the buffers."""
        if self.cache is not None:
            self.cache.warm = False
        if self.runner is not None:
            self.runner.reset()
        self.records = []
        self.policy.reset()

    def _ensure(self, batch: int, seq_len: int, device: torch.device) -> StepCache:
        # Normal tensors even when called under inference_mode (generate() is): inference
        # tensors could not be written by a later call made outside it.
        with torch.inference_mode(False):
            if self.cache is None or not self.cache.fits(batch, seq_len, device):
                self.cache = None  # a failed allocation below leaves nothing half made
                self._buffers_for = None
                self.graphs.clear()  # the captured graphs point at the old buffers
                self.cache = StepCache.allocate(self.program, batch, seq_len, device)
            tracing = self.cache.activity is not None
            if self.record_activity != tracing:
                self.cache.activity = (
                    torch.zeros(self.n_layers, batch, seq_len, device=device)
                    if self.record_activity
                    else None
                )
                self.graphs.clear()
            setattr(self.policy, "record_similarity", self.record_similarity)
            owner = (id(self.policy), batch, seq_len, device, self.record_similarity)
            if self._buffers_for != owner:
                self.buffers = self.policy.allocate(self.program, batch, seq_len, device)
                self._buffers_for = owner
                self.cache.warm = False  # new buffers hold nothing yet
                self.graphs.clear()
        return self.cache

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        logit_positions: torch.Tensor,
        extras: tuple[torch.Tensor, ...] = (),
        **host_info,
    ) -> StepOutput:
        """Run one step; ``extras`` are the model's extra step inputs (``StepProgram.input_names``
        after the first three), ``host_info`` the :class:`HostState` fields the caller knows
        (block bounds, response start, the last step's commits, ...)."""
        bsz, seq_len = input_ids.shape
        if self.runner is None:
            warm = self._ensure(bsz, seq_len, input_ids.device).warm
        else:
            warm = self.runner.prepare(bsz, seq_len)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # ``relayout`` (serving: the rows moved to new columns) makes a warm cache cold too
        cold = not warm or bool(host_info.get("relayout", False))
        host = HostState(input_ids, attention_mask, cold=cold, n_layers=self.n_layers, **host_info)
        plan = self.policy.plan(host)
        inp = StepInputs(
            input_ids,
            attention_mask,
            position_ids,
            logit_positions,
            _block_rows(host, logit_positions),
            plan.rows,
            plan.span_start,
            plan.span_len,
            tuple(extras),
        )
        # a policy that may find its step wanting (DyLLM: rows beyond the capacity) runs it again
        # from the state it started from: a copy kept here, or the runner's own checkpoint
        saved = None
        if self.policy.may_rerun(plan):
            saved = self._state_copy() if self.runner is None else self.runner.checkpoint()
        out = self._run(plan, inp) if self.runner is None else self.runner.run(host, plan, inp)
        counts = out.counts.tolist() if out.counts is not None else None  # the step's one host read
        again = self.policy.rerun(plan, counts) if saved is not None else None
        if again is not None:
            plan = again
            if self.runner is None:
                for tensor, kept in zip(self._state(), saved):
                    tensor.copy_(kept)
                out = self._run(plan, inp)
            else:
                self.runner.restore(saved)
                out = self.runner.run(host, plan, inp)
            counts = out.counts.tolist() if out.counts is not None else None
        report = self.policy.observe(plan, counts, self.n_layers, seq_len)
        if again is not None:
            report.extra["rerun"] = True
        record = StepRecord(
            report.active,
            seq_len,
            plan.kind,
            report.capacity,
            report.overflow,
            extra=report.extra,
            key=plan.key,
        )
        if self.record_similarity and self.runner is None:
            sims = self.policy.similarity(self.buffers, plan)
            record.similarity = (
                [None if s is None else _host_copy(s) for s in sims] if sims else [None] * self.n_layers
            )
        if self.cache is not None and self.cache.activity is not None:
            record.activity = _host_copy(self.cache.activity)
        self.records.append(record)
        out.report = report
        return out

    def _state(self) -> list[torch.Tensor]:
        """Every tensor a step writes: the cache's and the policy's buffers."""
        return [*self.cache.tensors, *_tensors(self.buffers)]

    def _state_copy(self) -> list[torch.Tensor]:
        return [t.clone() for t in self._state()]

    def _run(self, plan: Plan, inp: StepInputs) -> StepOutput:
        """The policy's own step on the engine's cache and buffers."""
        cache = self.cache
        # Any failure below leaves the cache half-written: mark it cold until a step completes.
        cache.warm = False
        if cache.activity is not None:
            cache.activity.zero_()
        if self.cuda_graphs and inp.input_ids.is_cuda:
            out = self._replay(plan, inp)
        elif self.compile:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                out = self.step_function(plan)(inp, cache, self.buffers)
        else:
            out = self._eager(plan)(inp, cache, self.buffers)
        cache.warm = True
        return out

    def _eager(self, plan: Plan) -> Callable:
        static = Plan(plan.key)  # the step reads only the key; tensors come in through ``inp``
        policy, pieces = self.policy, self.pieces
        return lambda inp, cache, buffers: policy.step(pieces, static, inp, cache, buffers)

    def step_function(self, plan: Plan) -> Callable:
        """The compiled step for ``plan``'s key (built on first use)."""
        fn = self._compiled.get(plan.key)
        if fn is None:
            step = _own_code(self._eager(plan))
            fn = torch.compile(step, backend=self.compiler, fullgraph=True, dynamic=False)
            self._compiled[plan.key] = fn
        return fn

    def _replay(self, plan: Plan, inp: StepInputs) -> StepOutput:
        names = [
            f.name for f in fields(StepInputs) if f.name != "extras" and getattr(inp, f.name) is not None
        ]
        run = self.step_function(plan) if self.compile else self._eager(plan)
        cache, buffers = self.cache, self.buffers
        n_named = len(names)

        def body(*tensors):
            given = dict(zip(names, tensors[:n_named]))
            out = run(StepInputs(**given, extras=tuple(tensors[n_named:])), cache, buffers)
            return out.logits, out.eligible, out.counts

        state = [*cache.tensors, *_tensors(buffers)]
        inputs = (*(getattr(inp, n) for n in names), *inp.extras)
        logits, eligible, counts = self.graphs.run(plan.key, body, inputs, state)
        return StepOutput(logits, eligible, counts)


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs, and counts recompiles
    against its limits, per code object, and every step function is the same lambda: without
    this, the plan keys of every engine in the process would share one budget, and the 65th graph
    compiled in a process (a benchmark of many methods) would fail."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


def _block_rows(host: HostState, logit_positions: torch.Tensor) -> torch.Tensor | None:
    """The rows whose logits predict the current block (shifted for Dream), or None."""
    if host.block_start is None:
        return None
    start, end = host.block_start - host.logits_shift, host.block_end - host.logits_shift
    return torch.arange(start, end, device=logit_positions.device).expand(host.batch, -1)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy on the CPU (never a view of the device buffer, which the next step
    overwrites)."""
    return t.detach().to("cpu", dtype=torch.float32, copy=True)


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a policy's buffers (a dataclass of tensors, lists and dicts of them)."""
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for f in fields(obj) for t in _tensors(getattr(obj, f.name))]
    return []


__all__ = ["CompileCounter", "RECOMPILE_LIMIT", "StepEngine", "StepRecord", "StepRunner"]
