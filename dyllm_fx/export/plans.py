"""Everything an export of a row policy's step needs, built once for ONNX and TensorRT alike:
the traced policy copy, its state layout, the plan keys (listed for a layout, or given), the
branches that serve them (one graph each), and what each branch's step returns (counts,
eligible), found by running each branch once eagerly."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dyllm_fx.runtime.policies import make_policy
from dyllm_fx.runtime.policies.keys import PlanKey

from .metadata import policy_config
from .plan_keys import SEQ, Branch, KeyRange, Layout, branches, decode_key, graph_key, plan_keys, size_count
from .policy_step import (
    PolicyStep,
    StateLayout,
    example_inputs,
    export_policy,
    graph_params,
    plain_torch_ops,
)
from .step_module import ExportError


@dataclass
class PlanBuild:
    step: PolicyStep
    keys: list[KeyRange]  # the graph keys the file serves
    branches: list[Branch]  # the graphs that serve them
    layout: Layout
    device: torch.device
    counts: list[int]  # per branch: the length of its step's counts
    eligible: list[bool]  # per branch: whether its step returns eligible rows

    def tracing(self):
        """The context to trace the step in: plain-torch ops, no autograd."""
        stack = contextlib.ExitStack()
        stack.enter_context(plain_torch_ops())
        stack.enter_context(torch.no_grad())
        return stack

    def example(self, i: int) -> tuple:
        """Example inputs of branch ``i``."""
        params = dict(zip(self.step.params, self.step.param_values))
        return example_inputs(
            self.step.layout,
            self.branches[i],
            params,
            self.step.spec,
            self.layout.block,
            self.device,
            self.step.n_sizes,
        )

    def plans_metadata(self) -> list[dict]:
        """Per graph key: the key, the branch that serves it, its sequence lengths."""
        branch_of = {kr: i for i, b in enumerate(self.branches) for kr in b.members}
        return [
            {"key": kr.key.to_json(), "branch": branch_of[kr], "min_seq": kr.min_seq, "max_seq": kr.max_seq}
            for kr in self.keys
        ]

    def branches_metadata(self) -> list[dict]:
        """Per branch (the ``plan`` input's value): its key, counts length, eligible flag and
        sequence lengths."""
        return [
            {"key": b.key.to_json(), "counts": n, "eligible": e, "min_seq": b.min_seq, "max_seq": b.max_seq}
            for b, n, e in zip(self.branches, self.counts, self.eligible)
        ]

    def input_names(self) -> list[str]:
        from .onnx_plans import input_names

        return input_names(self.step.layout.names, self.step.params, self.step.n_sizes)

    def state_metadata(self) -> list:
        return [e.to_json() for e in self.step.layout.entries]

    def graph_info(self, model, model_path=None):
        """The :class:`~dyllm_fx.export.metadata.StepGraphInfo` of these plan graphs."""
        from .metadata import step_graph_info
        from .onnx_plans import output_names

        return step_graph_info(
            model,
            model_path,
            graph="plans",
            inputs=self.input_names(),
            outputs=output_names(self.step.layout.names),
            plans=self.plans_metadata(),
            branches=self.branches_metadata(),
            state=self.state_metadata(),
            params=dict(zip(self.step.params, self.step.param_values)),
            layout=self.layout.to_json(),
        )


def _given_keys(keys, layout: Layout) -> list[KeyRange]:
    """Graph keys given by the caller, each for the sequence lengths its sizes allow."""
    out = []
    for key in keys:
        key = key if isinstance(key, PlanKey) else decode_key(key)
        sizes = list(key.ints())
        lo = max(layout.gen_length + 1, max(sizes, default=0) + 1)
        if lo > layout.max_seq:
            raise ExportError(f"plan key {key} needs sequences longer than max_seq={layout.max_seq}")
        out.append(KeyRange(key, lo, layout.max_seq))
    return sorted(set(out), key=lambda kr: str(kr.key))


def check_round_trip(policy) -> dict:
    """The policy's parameters as recorded in the metadata; ExportError when they do not rebuild
    the same policy (a custom subclass, an attribute the constructor changes)."""
    config = policy_config(policy)
    try:
        rebuilt = make_policy(policy.name, **config)
    except (TypeError, ValueError) as err:
        raise ExportError(
            f"policy {policy.name!r}: its parameters {config} do not rebuild it ({err})"
        ) from err
    if type(rebuilt) is not type(policy) or policy_config(rebuilt) != config:
        raise ExportError(
            f"policy {policy.name!r} ({type(policy).__name__}) is not rebuilt by make_policy from {config}"
        )
    return config


def build_plan_step(model, layout: Layout, keys=None, by_shape: bool = True) -> PlanBuild:
    """The :class:`PolicyStep` of ``model``'s row policy, its plan keys, their branches (one per
    kind of step, or with ``by_shape=False`` one per key: ``plan_keys.branches``) and what each
    branch's step returns."""
    spec, program = model.diffusion, model.program
    layout = layout.check(spec.max_length)
    check_round_trip(model.policy)
    traced = export_policy(model.policy, spec)
    device = next(model.parameters()).device
    state = StateLayout(program, traced, device)
    params = graph_params(traced)
    n_layers = len(program.attn)
    ranges = (
        plan_keys(traced, layout, n_layers, spec.logits_shift) if keys is None else _given_keys(keys, layout)
    )
    groups = branches(ranges, by_shape)
    step = PolicyStep(
        program, traced, state, params, counts_len=0, n_sizes=size_count(b.key for b in groups)
    ).eval()
    step.spec = spec
    build = PlanBuild(step, ranges, groups, layout, device, [], [])
    with build.tracing():
        for i, branch in enumerate(groups):
            step.key = branch.key
            step(*build.example(i))  # eager: what the branch's step returns, and that its inputs fit
            build.counts.append(step.last_counts)
            build.eligible.append(step.last_eligible)
    step.counts_len = max(build.counts, default=0)
    return build


@contextlib.contextmanager
def record_plan_keys(model):
    """Collect the graph keys the steps of ``model`` (a TransformedModel) plan while the block
    runs, e.g. a calibration generation whose keys ``to_onnx(..., keys=...)`` then exports::

        with record_plan_keys(fast) as keys:
            dyllm_fx.generate(fast, tokenizer, prompts)
        to_onnx(fast, "step.onnx", keys=keys)
    """
    policy = model.policy
    keys: list = []
    plan = policy.plan

    def recording(host):
        out = plan(host)
        key = graph_key(out.key, host.seq_len)
        if key not in keys:
            keys.append(key)
        return out

    policy.plan = recording
    try:
        yield keys
    finally:
        del policy.plan


__all__ = ["Layout", "PlanBuild", "SEQ", "build_plan_step", "check_round_trip", "record_plan_keys"]
