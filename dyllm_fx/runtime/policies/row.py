"""What the policies that pick rows over a scope share: the scope itself, plans over a span of
it, and the rows of such a plan's step."""

from __future__ import annotations

import torch

from ..rows import span_rows
from .base import HostState, Plan, Policy, StepInputs, check_scope, scope_span
from .keys import PlanKey


class RowPolicy(Policy):
    """A row-level policy (``dyllm``, ``es_dllm``, ``dllm_cache``): it runs within ``scope``
    (``all``, ``response``, or the block cache's ``block`` / ``suffix`` when composed)."""

    def __init__(self, scope: str):
        self.scope = check_scope(scope)

    @property
    def _composed(self) -> bool:
        return self.scope in ("block", "suffix")

    def layout_span(self, layout, seq_len: int, block: int) -> tuple[int, int]:
        """The scope's [start, end) at block ``block`` of a ``seq_len``-token generation of
        ``layout`` (what ``HostState.span`` gives the plan at that block)."""
        start, end = layout.block_bounds(seq_len, block)
        return scope_span(self.scope, seq_len, start, end, seq_len - layout.gen_length)


def span_plan(key: PlanKey, host: HostState, start: int, end: int, **note) -> Plan:
    """A plan whose step reads the span [start, end) of every batch element (``span_rows``
    of the key's ``width``); ``note``: host bookkeeping for ``observe``."""
    return Plan(key, span_start=host.column(start), span_len=host.column(end - start), note=note)


def plan_span_rows(plan: Plan, inp: StepInputs) -> torch.Tensor:
    """The (B, width) rows of a span plan's step (bucket padding repeats a span's last row)."""
    return span_rows(inp.span_start, inp.span_len, plan.key.width)[0]


__all__ = ["RowPolicy", "plan_span_rows", "span_plan"]
