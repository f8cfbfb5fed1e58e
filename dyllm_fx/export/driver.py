"""Exported step graphs as runners of the runtime's one step engine.

An exported graph (``step_module.ExportableStep``, or a row policy's graph per branch of plan keys) computes
one step and returns its state. Everything else is the runtime's own
:class:`~dyllm_fx.runtime.engine.StepEngine`: the host state, the policy's plan, its ``observe``
of the step's counts, the step records, and (through ``runtime.step.SparseStep``) the step
contract ``dyllm_fx.generate`` and its samplers run on. The runners here are the engine's
``runner``: they feed a backend that runs the graph (onnxruntime, a TensorRT-compiled module,
the eager module itself) the step's inputs and keep the state between steps in whatever form
the backend keeps it (on its device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from dyllm_fx.runtime.engine import StepEngine, StepRunner
from dyllm_fx.runtime.policies import HostState, Plan, Policy, StepInputs, StepOutput, make_policy
from dyllm_fx.runtime.policies.keys import decode_key
from dyllm_fx.runtime.policies.uniform import plan_rows
from dyllm_fx.runtime.step import SparseStep

from .metadata import StepGraphInfo
from .plan_keys import branch_key, branch_sizes, graph_key, size_count
from .policy_step import size_inputs, size_names
from .step_module import ExportError, check_layer_uniform


class StepBackend(Protocol):
    """Runs an exported step; caches stay in the backend's own form between calls."""

    def zeros(self, shape: Sequence[int], dtype: str) -> Any:
        """A zero cache tensor (``dtype`` a torch dtype name such as ``"float32"``)."""
        ...

    def run(self, inputs: dict[str, torch.Tensor], caches: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """One step: host int64 inputs by name and the caches in input order -> (logits on the
        host, updated caches)."""
        ...


def cache_layout(info: StepGraphInfo, batch: int, seq_len: int) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of ``hidden`` then of K and V per layer, in the graph's input order."""
    layout = [((batch, seq_len, info.hidden_size), info.hidden_dtype)]
    for k_shape, v_shape in info.kv_shapes:
        layout.append(((batch, k_shape[0], seq_len, k_shape[1]), info.kv_dtype))
        layout.append(((batch, v_shape[0], seq_len, v_shape[1]), info.kv_dtype))
    return layout


def build_policy(info: StepGraphInfo, policy: str | Policy | None) -> Policy:
    """The policy the graph was exported with (from its metadata), or the one given."""
    if policy is None:
        policy = make_policy(info.policy, **info.policy_config)
    elif isinstance(policy, str):
        policy = make_policy(policy)
    check_layer_uniform(policy)
    return policy


class TorchBackend:
    """Runs a torch callable with the exported step's signature (the eager ``ExportableStep``,
    or a compiled one such as TensorRT's); caches are torch tensors on ``device``."""

    def __init__(self, step, device: torch.device | str):
        self.step = step
        self.device = torch.device(device)

    def zeros(self, shape: Sequence[int], dtype: str) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=getattr(torch, dtype), device=self.device)

    def run(
        self, inputs: dict[str, torch.Tensor], caches: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        args = [t.to(self.device) for t in inputs.values()]  # in the graph's input order
        with torch.no_grad():
            logits, *caches = self.step(*args, *caches)
        return logits.cpu(), caches


def _host_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The graph's int64 inputs on the host, in the graph's input order."""
    return {name: t.to("cpu", torch.long).contiguous() for name, t in inputs.items()}


class _GraphRunner:
    """A runner's state bookkeeping: allocated per (batch, length), warm once a step completed."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.state: list[Any] | None = None
        self.size: tuple[int, int] | None = None
        self.warm = False

    def _allocate(self, batch: int, seq_len: int) -> list[Any]:
        raise NotImplementedError

    def prepare(self, batch: int, seq_len: int) -> bool:
        if self.size != (batch, seq_len):
            self.state = self._allocate(batch, seq_len)
            self.size = (batch, seq_len)
            self.warm = False
        return self.warm

    def reset(self) -> None:
        self.warm = False

    def checkpoint(self) -> tuple:
        """The state as it is: the graphs are functional (they return new state tensors and
        leave their inputs as they were), so the references are the checkpoint."""
        return list(self.state) if self.state is not None else None, self.warm

    def restore(self, handle: tuple) -> None:
        state, self.warm = handle
        self.state = list(state) if state is not None else None


class UniformGraphRunner(_GraphRunner):
    """A layer-uniform step graph as a :class:`~dyllm_fx.runtime.engine.StepRunner`: the plan's
    rows (every row on a cold cache) go in as the graph's ``rows`` input."""

    def __init__(self, backend: StepBackend, info: StepGraphInfo):
        super().__init__(len(info.kv_shapes))
        self.backend = backend
        self.info = info

    def _allocate(self, batch: int, seq_len: int) -> list[Any]:
        return [self.backend.zeros(shape, dtype) for shape, dtype in cache_layout(self.info, batch, seq_len)]

    def run(self, host: HostState, plan: Plan, inp: StepInputs) -> StepOutput:
        rows = plan_rows(plan, host.batch, host.seq_len, "cpu")
        inputs = {
            "input_ids": inp.input_ids,
            "attention_mask": inp.attention_mask,
            "position_ids": inp.position_ids,
            "rows": rows,
            "logit_positions": inp.logit_positions,
        }
        self.warm = False  # a failed step leaves the caches half written
        logits, self.state = self.backend.run(_host_inputs(inputs), self.state)
        self.warm = True
        return StepOutput(logits.to(host.device))


class ExportedStepModel(nn.Module):
    """An exported step wrapped so ``dyllm_fx.generate(model, tokenizer, prompts)`` runs it.

    ``generate`` reads ``diffusion`` (the spec), calls ``make_step_function()`` and puts the
    prompt on the device of the module's tensors. The only tensor here is an empty host
    buffer: the backends take host inputs and keep just the caches on their own device. The
    backend is deliberately not a submodule, so its weights (possibly on a GPU) stay out of
    ``parameters()``. ``engine`` is the runtime's step engine over the graph's runner
    (``engine.records``: each step's report).
    """

    def __init__(self, backend, info: StepGraphInfo, policy: Policy):
        super().__init__()
        self.backend = backend
        self.info = info
        self.policy = policy
        self.diffusion = info.spec
        self.register_buffer("host", torch.empty(0), persistent=False)
        self.engine = StepEngine(None, policy, runner=self.make_runner(backend, info, policy))

    def make_runner(self, backend, info: StepGraphInfo, policy: Policy) -> StepRunner:
        """The engine's runner over ``backend`` (a layer-uniform graph's here)."""
        return UniformGraphRunner(backend, info)

    def make_step_function(self) -> SparseStep:
        return SparseStep(self.engine, self.diffusion)

    def forward(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} runs denoising steps, not forward passes; "
            "call dyllm_fx.generate(model, tokenizer, prompts)"
        )


# --- row policies: the host half of a step exported per branch of plan keys ------------------


class PlanBackend(Protocol):
    """Runs an exported plan step graph; its state stays in the backend's form between calls."""

    def zeros(self, entry, batch: int, seq_len: int) -> Any:
        """A state tensor of ``entry`` (a ``StateEntry``) for a (batch, seq_len) generation."""
        ...

    def run(self, index: int, inputs: dict[str, torch.Tensor], state: list[Any]) -> tuple:
        """The step of branch ``index``: host inputs by name and the state in input order ->
        (logits, eligible, counts) on the host and the updated state."""
        ...


class PlanGraphRunner(_GraphRunner):
    """A row policy's step graphs, one per branch of plan keys, as a
    :class:`~dyllm_fx.runtime.engine.StepRunner`: the plan's key picks the branch, its sizes,
    its span and the policy's input parameters (DyLLM's tau) go in with the tokens, the cache
    and the policy's buffers stay in the backend."""

    def __init__(self, backend: PlanBackend, info: StepGraphInfo, policy: Policy):
        from .policy_step import StateEntry

        super().__init__(info.n_layers)
        self.backend = backend
        self.info = info
        self.policy = policy
        self.state_entries = [StateEntry.from_json(e) for e in info.state]
        self.keys = [decode_key(p["key"]) for p in info.plans]
        self.branch_of = {key: int(p["branch"]) for key, p in zip(self.keys, info.plans)}
        self.branch_keys = [decode_key(b["key"]) for b in info.branches]
        self.branch_seq = [(int(b["min_seq"]), int(b["max_seq"])) for b in info.branches]
        self.counts_len = [int(b["counts"]) for b in info.branches]
        self.has_eligible = [bool(b["eligible"]) for b in info.branches]
        self.param_names = list(info.params)
        self.n_sizes = size_count(self.branch_keys)

    def _allocate(self, batch: int, seq_len: int) -> list[Any]:
        return [self.backend.zeros(e, batch, seq_len) for e in self.state_entries]

    def branch_index(self, key, seq_len: int) -> int:
        """The branch that runs ``key``: the one the file lists it under, else the one of its
        kind whose sequence range holds ``seq_len`` (the sizes are inputs, so a capacity the
        export's layout did not list, as another tau may reach, runs too)."""
        gkey = graph_key(key, seq_len)
        if gkey in self.branch_of:
            return self.branch_of[gkey]
        kind = branch_key(key)
        for i, (bkey, (lo, hi)) in enumerate(zip(self.branch_keys, self.branch_seq)):
            if bkey == kind and lo <= seq_len <= hi:
                return i
        layout = ", ".join(f"{k}={v}" for k, v in self.info.layout.items() if v is not None)
        raise ExportedPlanMissing(
            f"this step graph has no branch for plan key {gkey} (sequence length {seq_len}); it was "
            "exported for "
            f"{layout} ({len(self.keys)} keys). Export again for this generation's layout: dyllm export "
            "--onnx ... "
            "--gen-length N --block-length N [--steps N | --threshold] [--max-seq N]"
        )

    def check_layout(self, host: HostState) -> None:
        """The generation's response and block lengths are the ones the plan keys were listed
        for (else its steps would meet keys the file lacks): a clear error before the first step."""
        layout = self.info.layout
        if host.block_start is None or host.response_start is None or not layout:
            return
        gen, block = host.seq_len - host.response_start, host.block_end - host.block_start
        if (gen, block) != (layout.get("gen_length"), layout.get("block_length")):
            raise ExportedPlanMissing(
                f"this step graph was exported for gen_length={layout.get('gen_length')}, "
                f"block_length={layout.get('block_length')}; the generation has gen_length={gen}, "
                f"block_length={block}. "
                f"Generate with those lengths (--gen-length {layout.get('gen_length')} --block-length "
                f"{layout.get('block_length')}) or export again with --gen-length {gen} --block-length "
                f"{block}"
            )
        if layout.get("max_seq") is not None and host.seq_len > layout["max_seq"]:
            raise ExportedPlanMissing(
                f"the prompt and response take {host.seq_len} tokens, more than the "
                f"max_seq={layout['max_seq']} this "
                "step graph was exported for; export again with a larger --max-seq"
            )

    def run(self, host: HostState, plan: Plan, inp: StepInputs) -> StepOutput:
        if host.cold:
            self.check_layout(host)
        branch = self.branch_index(plan.key, host.seq_len)
        zeros = torch.zeros(host.batch, dtype=torch.long)
        inputs = {
            "input_ids": inp.input_ids,
            "attention_mask": inp.attention_mask,
            "position_ids": inp.position_ids,
            "logit_positions": inp.logit_positions,
            "span_start": zeros if plan.span_start is None else plan.span_start,
            "span_len": zeros if plan.span_len is None else plan.span_len,
        }
        inputs = _host_inputs(inputs)
        for name in self.param_names:
            inputs[name] = torch.tensor(float(getattr(self.policy, name)), dtype=torch.float32)
        sizes = size_inputs(branch_sizes(self.branch_keys[branch], plan.key), self.n_sizes)
        inputs.update(zip(size_names(self.n_sizes), sizes))
        self.warm = False  # a failed step leaves the state half written
        logits, eligible, counts, self.state = self.backend.run(branch, inputs, self.state)
        self.warm = True
        n = self.counts_len[branch]
        return StepOutput(logits, eligible if self.has_eligible[branch] else None, counts[:n] if n else None)


class ExportedPlanMissing(ValueError):
    """The generation reached a plan key the exported file has no graph for."""


class PlanStepModel(ExportedStepModel):
    """An exported row-policy step, for ``dyllm_fx.generate``: the engine's runner is a
    :class:`PlanGraphRunner`."""

    def make_runner(self, backend, info: StepGraphInfo, policy: Policy) -> StepRunner:
        return PlanGraphRunner(backend, info, policy)


class TorchPlanBackend:
    """Runs per-branch torch callables with :class:`~dyllm_fx.export.policy_step.PolicyStep`'s
    signature (exported programs, TensorRT-compiled modules); state as torch tensors."""

    def __init__(self, steps: Sequence, device: torch.device | str):
        self.steps = list(steps)
        self.device = torch.device(device)

    def zeros(self, entry, batch: int, seq_len: int) -> torch.Tensor:
        return torch.full(
            entry.concrete(batch, seq_len), entry.fill, dtype=getattr(torch, entry.dtype), device=self.device
        )

    def run(self, index: int, inputs: dict[str, torch.Tensor], state: list[torch.Tensor]):
        args = [t.to(self.device) for t in inputs.values()]
        with torch.no_grad():
            logits, eligible, counts, *state = self.steps[index](*args, *state)
        return logits.cpu(), eligible.cpu(), counts.cpu(), state


def plan_policy(info: StepGraphInfo, policy: str | Policy | None, params: dict | None = None) -> Policy:
    """The policy a plan graph runs with: the recorded one (``policy`` None), or one given by
    name or object, which must equal the exported one but for the graph's input parameters
    (``info.params``: DyLLM's tau); ``params`` sets those on the recorded policy."""
    from .metadata import policy_config

    recorded = dict(info.policy_config)
    if policy is None:
        policy = make_policy(info.policy, **{**recorded, **(params or {})})
    else:
        if params:
            raise ValueError("pass policy parameters either in the policy object or as params, not both")
        if isinstance(policy, str):
            policy = make_policy(policy)
    if policy.name != info.policy:
        raise ExportError(
            f"this step graph was exported for policy {info.policy!r} and cannot run {policy.name!r}: each "
            "row "
            f"policy's step is its own graph; export {policy.name!r} with `dyllm export --onnx FILE --policy "
            f"{policy.name}`"
        )
    given = policy_config(policy)
    differ = sorted(
        k for k in set(given) | set(recorded) if k not in info.params and given.get(k) != recorded.get(k)
    )
    if differ:
        detail = ", ".join(f"{k}={given.get(k)!r} (exported with {recorded.get(k)!r})" for k in differ)
        raise ExportError(
            f"policy parameters fixed by the export differ: {detail}; only {sorted(info.params) or 'none'} "
            "can change "
            "without exporting again"
        )
    return policy


__all__ = [
    "ExportedPlanMissing",
    "ExportedStepModel",
    "PlanBackend",
    "PlanGraphRunner",
    "PlanStepModel",
    "StepBackend",
    "TorchBackend",
    "TorchPlanBackend",
    "UniformGraphRunner",
    "build_policy",
    "cache_layout",
    "plan_policy",
]
