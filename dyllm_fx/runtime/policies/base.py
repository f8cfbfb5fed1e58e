"""The policy contract: a host-side plan per step, and the step itself as tensor code.

A policy decides which rows each layer recomputes. It does so in two halves:

* ``plan(host)`` runs on the host before the step, from what the host already knows (the
  tokens, the block, the counts the previous step reported). It returns a :class:`Plan`: a
  hashable, typed ``key`` (``keys.py``) that fixes every shape of the step (a width, a capacity),
  plus small tensors the step reads (a row list, a span) that may change from step to step
  without changing a shape.
* ``step(pieces, plan, inp, cache, buffers)`` is the step: torch ops only, no host reads, no
  data-dependent shapes. Per-layer choices (DyLLM's salient rows, ES-dLLM's kept rows) are
  top-C selections with the capacity in ``plan.key``. The same function runs eagerly, under
  ``torch.compile(fullgraph=True)``, inside a CUDA graph and through ``torch.export``.

After the step the engine reads the step's ``counts`` (one small tensor) back once and hands it
to ``observe``, which returns what the step did (active rows per layer, overflow) and lets the
policy size the next step's capacity.

A cold cache (the first step of a generation) always runs :func:`full_step`, whatever the
policy; ``record`` lets a policy fill its own buffers from that step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache import StepCache
from ..pieces import Pieces
from ..rows import mark, take, write_rows
from .keys import FullKey, PlanKey

SCOPES = ("all", "response", "block", "suffix")


def check_scope(scope: str) -> str:
    """``scope`` if it is one of :data:`SCOPES`, else a ValueError."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}; got {scope!r}")
    return scope


def scope_span(
    scope: str, seq_len: int, block_start: int | None, block_end: int | None, response_start: int | None
) -> tuple[int, int]:
    """The [start, end) rows of ``scope``: ``all``, ``response`` (from the response start),
    ``block`` (the current block) or ``suffix`` (the current block and everything after); the
    whole sequence when no block is known."""
    if scope == "all" or block_start is None:
        return 0, seq_len
    if scope == "response":
        return (response_start if response_start is not None else 0), seq_len
    if check_scope(scope) == "block":
        return block_start, block_end
    return block_start, seq_len


@dataclass(frozen=True)
class HostState:
    """What the host knows before a step: everything a plan may depend on."""

    input_ids: torch.Tensor  # (B, L), on the model's device
    attention_mask: torch.Tensor  # (B, L) 1 for real tokens, 0 for left padding
    cold: bool  # the cache is empty: this step runs every row
    n_layers: int
    step: int = 0  # forward evaluations so far in this generation
    block_start: int | None = None  # current block [start, end), when the caller is the denoising loop
    block_end: int | None = None
    response_start: int | None = None  # first response position (None: unknown)
    mask_token_id: int | None = None
    logits_shift: int = 0  # 1 for Dream: the logit of position p is read at row p - 1
    last_committed: int = 0  # tokens the previous step committed, most of any batch element
    # per batch element, the smallest position the previous step committed (None: nothing)
    last_leftmost: tuple[int | None, ...] | None = None
    # The caller moved the rows to new columns (the serving scheduler, at a block boundary:
    # rows joined or left the batch). Nothing cached is valid, so the step is cold, but the
    # generation goes on: policies keep their schedule counters (DyLLM does not restart its
    # dense warm-up steps) instead of resetting as at a new generation.
    relayout: bool = False

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def span(self, scope: str) -> tuple[int, int]:
        """The [start, end) rows of ``scope`` (see :func:`scope_span`)."""
        return scope_span(scope, self.seq_len, self.block_start, self.block_end, self.response_start)

    def column(self, value: int) -> torch.Tensor:
        """``value`` for every batch element, as a (B,) int64 tensor on the device."""
        return torch.full((self.batch,), value, dtype=torch.long, device=self.device)


@dataclass(frozen=True)
class Plan:
    """One step's shape (``key``) and the small per-step tensors the step reads."""

    key: PlanKey  # hashable, typed (``keys.py``): one compiled step per key
    rows: torch.Tensor | None = None  # (B, A) rows for policies that pick them on the host
    span_start: torch.Tensor | None = None  # (B,) a policy-defined span
    span_len: torch.Tensor | None = None  # (B,)
    # host-side bookkeeping for ``observe`` (e.g. the row count before bucket padding); not
    # part of the step's shape
    note: dict = field(default_factory=dict, compare=False)

    @property
    def kind(self) -> str:
        return self.key.kind


FULL = Plan(FullKey())


@dataclass
class StepInputs:
    """The step's tensor arguments."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    logit_positions: torch.Tensor  # (B, P) rows whose logits the step returns
    # (B, block length) the rows whose logits predict the current block's tokens (None: no
    # block known); the same as logit_positions when the loop calls, not through forward()
    block_rows: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # Plan.rows
    span_start: torch.Tensor | None = None  # Plan.span_start
    span_len: torch.Tensor | None = None  # Plan.span_len
    # the model's extra step inputs, after the three standard ones (``StepProgram.input_names``):
    # e.g. DiffusionGemma's self-conditioning logits, encoder K/V prefix and key masks
    extras: tuple[torch.Tensor, ...] = ()
    # a policy threshold as a 0-d fp32 tensor instead of the policy's own float (DyLLM's tau):
    # what an exported step graph takes as an input, so changing it needs no re-export; None:
    # the policy's value
    tau: torch.Tensor | None = None


@dataclass
class StepOutput:
    logits: torch.Tensor  # (B, P, V) at the logit positions
    # (B, P) bool: positions whose logits come from rows that ran every layer this step (the
    # sampler commits nothing else); None: all of them
    eligible: torch.Tensor | None = None
    counts: torch.Tensor | None = None  # int64 counters for ``observe`` (policy-defined)
    report: "StepReport | None" = None  # filled by the engine after the step


@dataclass
class StepReport:
    """What a step did, for the step record and the generation's statistics."""

    active: list[int]  # per layer: rows that ran the MLP, most of any batch element
    capacity: int = 0  # the step's top-C capacity (0: no selection)
    overflow: int = 0  # rows that qualified beyond the capacity (approximated instead), summed over layers
    extra: dict = field(default_factory=dict)


@dataclass
class LayerResult:
    """One layer of a full or row step, as a policy's ``record`` sees it."""

    layer: int
    rows: torch.Tensor  # (B, A) the rows it ran
    x: torch.Tensor  # (B, A, D) their input
    prologue: object  # the step's Prologue (tables), for pieces that need them
    h_mid: torch.Tensor  # after attention and its residual
    context: torch.Tensor  # (B, H, A, d) attention context
    branch: torch.Tensor  # the MLP branch's output
    out: torch.Tensor  # the layer's output


Record = Callable[[LayerResult], None]


def full_step(pieces: Pieces, inp: StepInputs, cache: StepCache, record: Record | None = None) -> StepOutput:
    """Every row through every layer (a cold cache, or a policy's refresh). ``record`` sees each
    layer's :class:`LayerResult`, e.g. to fill a policy's buffers."""
    return rows_step(pieces, inp, cache, None, record)


def rows_step(
    pieces: Pieces, inp: StepInputs, cache: StepCache, rows: torch.Tensor | None, record: Record | None = None
) -> StepOutput:
    """The rows ``rows`` (B, A) through every layer (None: every row); the other rows keep
    their cached K/V and final hidden state. Row lists may repeat a row (bucket padding)."""
    pro = pieces.prologue(inp.input_ids, inp.attention_mask, inp.position_ids, *inp.extras)
    if rows is None:
        bsz, seq_len = inp.input_ids.shape
        x, rows = pro.h0, torch.arange(seq_len, device=pro.h0.device).expand(bsz, -1)
    else:
        x = take(pro.h0, rows, 1)
    for layer in range(pieces.n_layers):
        out, h_mid, ctx, branch = pieces.layer(layer, x, rows, pro, cache)
        mark(cache.activity, layer, rows, 1.0)
        if record is not None:
            record(LayerResult(layer, rows, x, pro, h_mid, ctx, branch, out))
        x = out
    write_rows(cache.hidden, rows, x, 1)
    return StepOutput(head_logits(pieces, cache, inp.logit_positions))


def head_logits(pieces: Pieces, cache: StepCache, positions: torch.Tensor) -> torch.Tensor:
    """The LM head at ``positions`` (B, P) from the cached final hidden state."""
    return pieces.head(take(cache.hidden, positions, 1), positions)


class Policy:
    """Base class: a policy that runs every row at every step (subclasses choose fewer)."""

    name = "base"
    # One row set per step, the same for every layer, chosen on the host (``Plan.rows``):
    # such a policy's step is also the exported graph of the block caches.
    layer_uniform = False

    def reset(self) -> None:
        """A new generation starts: forget per-generation host state."""

    def check_model(self, n_layers: int) -> None:
        """Raise a ValueError naming the fix when the policy cannot run on a model of this depth
        (called by ``transform()``, before any step)."""

    def bind(self, program) -> None:
        """The step program the policy will run on is known (called by the engine when it takes
        the policy, before any plan): a policy whose step structure depends on the program's
        pieces (e.g. which of them read per-position tables) decides it here, so that its plan
        keys say what the step runs."""

    def allocate(self, program, batch: int, seq_len: int, device: torch.device):
        """The policy's device buffers for a (batch, seq_len) generation (None: none)."""
        return None

    def buffer_nbytes(self, program, batch: int, seq_len: int) -> int:
        """Bytes ``allocate`` takes."""
        return 0

    def plan(self, host: HostState) -> Plan:
        return FULL

    def plan_keys(self, layout, seq_len: int, n_layers: int, shift: int) -> set[PlanKey] | None:
        """Every key :meth:`plan` can return on a ``seq_len``-token generation of ``layout`` (a
        checked :class:`~dyllm_fx.runtime.schedule.Layout`) for a model of ``n_layers`` layers
        whose logits are shifted by ``shift``; over-approximated where needed (a key never met
        costs an exported graph, a missing one fails the generation). None: this policy cannot
        list its keys (its shapes do not follow from the layout)."""
        return None

    def step(self, pieces: Pieces, plan: Plan, inp: StepInputs, cache: StepCache, buffers) -> StepOutput:
        return full_step(pieces, inp, cache, self.recorder(buffers))

    def recorder(self, buffers) -> Record | None:
        """What a full step records into the policy's buffers (None: nothing)."""
        return None

    def observe(self, plan: Plan, counts: list[int] | None, n_layers: int, seq_len: int) -> StepReport:
        """What the step did, from its ``counts``; the default: every row of every layer."""
        return StepReport([seq_len] * n_layers)

    def similarity(self, buffers, plan: Plan) -> list[torch.Tensor | None] | None:
        """Per layer (B, L) fp32 cosine of each row's attention context to the previous step's
        (NaN where not measured), for policies that measure it; None otherwise."""
        return None
