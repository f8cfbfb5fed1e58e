"""``dllm_cache``: dLLM-Cache (Liu et al., 2025): prompt and response cached at different
intervals, with the response rows whose values moved most refreshed adaptively.

* every ``prompt_interval`` steps (and at a cold cache) the whole sequence is recomputed;
* every ``response_interval`` steps the response is recomputed (the prompt stays cached);
* at the other steps each layer first projects V for every response row from its current
  input (the cheap check the method is built on), and recomputes the ``ratio`` fraction of rows
  whose V has the lowest cosine similarity to the cached V; the other rows keep their cached
  layer output.

``ratio=1.0`` recomputes the whole response at every step; with ``scope="all"`` that is
the vanilla forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...kernels.salient_rows import cosine_from_stats
from ..rows import mark, select_top, take, write_rows
from .base import FULL, HostState, Plan, StepOutput, StepReport, full_step, head_logits, rows_step
from .keys import FullKey, PlanKey
from .params import number
from .refresh import RefreshClock
from .row import RowPolicy, plan_span_rows, span_plan

# Similarities this close to 1 are an unchanged row's rounding noise (a few ulp of the cosine,
# whose deviation from 1 is second order in any real change): they are set to 1 exactly, so
# unchanged rows tie and the stable top-k picks among them by position, the same in every
# implementation of the step (eager, compiled, ONNX Runtime, another device), not by noise.
UNCHANGED = 1e-5


def value_similarity(v_new: torch.Tensor, v_cached: torch.Tensor, pieces=None) -> torch.Tensor:
    """Per row cosine similarity over all heads: (B, KV, A, d) x2 -> (B, A), fp32; values
    within :data:`UNCHANGED` of 1 are 1. For a tensor-parallel shard (``pieces.group``), over
    every rank's heads: the three per-row sums are added over the ranks first."""
    a, b = v_new.float().transpose(1, 2).flatten(2), v_cached.float().transpose(1, 2).flatten(2)
    if pieces is None or pieces.group is None:
        sim = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)
    else:
        stats = pieces.sum_over_shards(torch.stack([(a * b).sum(-1), (a * a).sum(-1), (b * b).sum(-1)], -1))
        sim = cosine_from_stats(stats[..., 0], stats[..., 1], stats[..., 2])
    return torch.where(sim > 1.0 - UNCHANGED, 1.0, sim)


@dataclass(frozen=True)
class ResponseKey(PlanKey):
    """The whole scope span, ``width`` rows, recomputed (the response refresh)."""

    kind: ClassVar[str] = "response"
    SIZES: ClassVar[tuple[str, ...]] = ("width",)
    width: int | str


@dataclass(frozen=True)
class AdaptiveKey(PlanKey):
    """Each layer recomputes the ``refreshed`` rows of the ``width``-row span whose values moved
    most."""

    kind: ClassVar[str] = "adaptive"
    SIZES: ClassVar[tuple[str, ...]] = ("width", "refreshed")
    width: int | str
    refreshed: int | str


@dataclass
class DLLMCacheBuffers:
    outputs: list[torch.Tensor]  # per layer but the last (B, L, D): each row's cached layer output


class DLLMCachePolicy(RowPolicy):
    name = "dllm_cache"

    def __init__(
        self,
        prompt_interval: int = 32,
        response_interval: int = 8,
        ratio: float = 0.25,
        scope: str = "response",
    ):
        self.ratio = number(
            "ratio",
            ratio,
            0.0,
            1.0,
            low_open=True,
            hint=" (the fraction of response rows refreshed per step)",
        )
        self.prompt_clock = RefreshClock(prompt_interval, on_new_block=False, name="prompt_interval")
        self.response_clock = RefreshClock(response_interval, on_new_block=False, name="response_interval")
        super().__init__(scope)
        self._shape: tuple | None = None

    def reset(self) -> None:
        self.prompt_clock.reset()
        self.response_clock.reset()

    def allocate(self, program, batch, seq_len, device) -> DLLMCacheBuffers:
        n = len(program.kv_shapes)
        size = (batch, seq_len, program.hidden_size)
        return DLLMCacheBuffers(
            [torch.zeros(size, dtype=program.hidden_dtype, device=device) for _ in range(n - 1)]
        )

    def buffer_nbytes(self, program, batch, seq_len) -> int:
        item = torch.empty((), dtype=program.hidden_dtype).element_size()
        return (len(program.kv_shapes) - 1) * batch * seq_len * program.hidden_size * item

    def plan(self, host: HostState) -> Plan:
        stale = self._shape != tuple(host.input_ids.shape)
        self._shape = tuple(host.input_ids.shape)
        full = self.prompt_clock.tick(host, force=stale)
        whole = self.response_clock.tick(host, force=full) or self.ratio >= 1.0
        if full:
            return FULL
        start, end = host.span(self.scope)
        if whole:
            return span_plan(ResponseKey(end - start), host, start, end, active=end - start)
        refreshed = self._refreshed(end - start)
        return span_plan(AdaptiveKey(end - start, refreshed), host, start, end, active=refreshed)

    def _refreshed(self, width: int) -> int:
        """The rows an adaptive step recomputes in a span of ``width`` rows."""
        return max(1, math.ceil(self.ratio * width))

    def plan_keys(self, layout, seq_len, n_layers, shift) -> set[PlanKey]:
        keys: set[PlanKey] = {FullKey()}
        for k in range(layout.num_blocks):
            start, end = self.layout_span(layout, seq_len, k)
            keys.add(ResponseKey(end - start))
            if self.ratio < 1.0:
                keys.add(AdaptiveKey(end - start, self._refreshed(end - start)))
        return keys

    def observe(self, plan, counts, n_layers, seq_len) -> StepReport:
        return StepReport([plan.note.get("active", seq_len)] * n_layers)

    def _output(self, buffers: DLLMCacheBuffers, cache, layer: int) -> torch.Tensor:
        return buffers.outputs[layer] if layer < len(buffers.outputs) else cache.hidden

    def step(self, pieces, plan, inp, cache, buffers: DLLMCacheBuffers) -> StepOutput:
        def record(r):
            if r.layer < len(buffers.outputs):
                write_rows(buffers.outputs[r.layer], r.rows, r.out, 1)

        if plan.kind == "full":
            return full_step(pieces, inp, cache, record)
        rows = plan_span_rows(plan, inp)
        if plan.kind == "response":
            return rows_step(pieces, inp, cache, rows, record)
        refreshed = plan.key.refreshed
        pro = pieces.prologue(inp.input_ids, inp.attention_mask, inp.position_ids, *inp.extras)
        x = take(pro.h0, rows, 1)  # (B, W, D) every response row's input to the layer
        everyone = torch.ones_like(rows, dtype=torch.bool)
        for layer in range(pieces.n_layers):
            _, v_new = pieces.kv(layer, x, rows, pro)
            sim = value_similarity(v_new, take(cache.v[layer], rows, 2), pieces)
            slots, _ = select_top(-sim, everyone, refreshed)  # the values that moved most
            r_rows = take(rows, slots, 1)
            out = pieces.layer(layer, take(x, slots, 1), r_rows, pro, cache)[0]
            mark(cache.activity, layer, r_rows, 1.0)
            dest = self._output(buffers, cache, layer)
            write_rows(dest, r_rows, out, 1)
            x = take(dest, rows, 1)
        return StepOutput(head_logits(pieces, cache, inp.logit_positions))


__all__ = ["AdaptiveKey", "DLLMCacheBuffers", "DLLMCachePolicy", "ResponseKey", "value_similarity"]
