"""Policies that recompute one row set per step, the same in every layer, chosen on the host.

The step is :func:`rows_step` on the chosen rows: no per-layer decision, so it is also what the
ONNX export of these policies contains. Row counts are padded to buckets (powers of two, capped
at the sequence length) by repeating a row, so a handful of shapes cover every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..rows import bucket_size, span_rows
from .base import FULL, HostState, Plan, Policy, StepOutput, StepReport, full_step, head_logits, rows_step
from .keys import PlanKey
from .row import plan_span_rows, span_plan


@dataclass(frozen=True)
class SpanKey(PlanKey):
    """The rows of a host-chosen span, ``width`` wide (bucketed), through every layer."""

    kind: ClassVar[str] = "span"
    SIZES: ClassVar[tuple[str, ...]] = ("width",)
    width: int | str


@dataclass(frozen=True)
class RowsKey(PlanKey):
    """A host-chosen row list (``Plan.rows``), ``width`` rows (bucketed), through every layer."""

    kind: ClassVar[str] = "rows"
    SIZES: ClassVar[tuple[str, ...]] = ("width",)
    width: int | str


@dataclass(frozen=True)
class NoRowsKey(PlanKey):
    """Nothing recomputed: the logits of the cached final hidden state."""

    kind: ClassVar[str] = "none"


class UniformPolicy(Policy):
    """Subclasses implement :meth:`rows` (explicit positions) or :meth:`span` (a range)."""

    layer_uniform = True

    def rows(self, host: HostState) -> torch.Tensor | None:
        """(B, A) positions every layer recomputes at this warm step; None: all of them."""
        span = self.span(host)
        if span is None:
            return None
        return host.column(span[0])[:, None] + torch.arange(span[1] - span[0], device=host.device)

    def span(self, host: HostState) -> tuple[int, int] | None:
        """[start, end) every layer recomputes at this warm step; None: every row."""
        return None

    def plan(self, host: HostState) -> Plan:
        if host.cold:
            return FULL
        if type(self).rows is UniformPolicy.rows:  # a span: its rows are built inside the step
            span = self.span(host)
            if span is None:
                return FULL
            start, end = span
            return span_plan(
                SpanKey(bucket_size(end - start, host.seq_len)), host, start, end, active=end - start
            )
        rows = self.rows(host)
        if rows is None:
            return FULL
        if rows.shape[1] == 0:  # nothing to recompute: the logits of the cached final hidden state
            return Plan(NoRowsKey(), note={"active": 0})
        width = bucket_size(rows.shape[1], host.seq_len)
        padded = (
            torch.cat([rows, rows[:, -1:].expand(-1, width - rows.shape[1])], 1)
            if width > rows.shape[1]
            else rows
        )
        return Plan(RowsKey(width), rows=padded.to(host.device), note={"active": rows.shape[1]})

    def step(self, pieces, plan, inp, cache, buffers):
        if plan.kind == "full":
            return full_step(pieces, inp, cache)
        if plan.kind == "none":
            return StepOutput(head_logits(pieces, cache, inp.logit_positions))
        rows = inp.rows if plan.kind == "rows" else plan_span_rows(plan, inp)
        return rows_step(pieces, inp, cache, rows)

    def observe(self, plan, counts, n_layers, seq_len) -> StepReport:
        return StepReport([plan.note.get("active", seq_len)] * n_layers)


def plan_rows(plan: Plan, batch: int, seq_len: int, device) -> torch.Tensor:
    """The (B, A) rows a uniform policy's plan recomputes, on the host (for exported steps,
    which take the row set as an input)."""
    if plan.kind == "full":
        return torch.arange(seq_len, device=device).expand(batch, -1)
    if plan.kind == "rows":
        return plan.rows.to(device)
    return span_rows(plan.span_start.to(device), plan.span_len.to(device), plan.key.width)[0]
