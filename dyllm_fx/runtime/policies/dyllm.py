"""``dyllm``: DyLLM's saliency-gated layers (arXiv 2603.08026; official code scale-snu/DyLLM,
mirrored as younjoo0614/DyLLM).

Between two denoising steps only the tokens just unmasked change, and their effect fades
through the layers. At a sparse step, each layer

* queries every row of its span (the response; the whole sequence every ``full_query_interval``
  steps, so prompt rows can become salient too), recomputes K/V only for the rows that changed
  in the previous layer (layer 0: the tokens committed at the last step), gives those rows exact
  attention and every other row the approximate update cached context + P[:, changed] . dV
  (``dyllm::approx_attention``), with the softmax normaliser recomputed over every key;
* marks as *salient* the rows whose new context has cosine similarity to the cached one below
  ``tau``: they get the MLP here and new K/V in the next layer; the others keep their cached
  MLP output. o_proj and the residual run for every queried row.

The first ``num_full_steps`` steps of a generation run every row; after them no step is dense.
Composed with a block cache (``dual_cache+dyllm``), "every row" is every row of the cache's scope:
the generation's first step and each block's first one refresh the whole sequence (the block
cache's refresh), the other dense steps recompute the block, as the block cache's own step does.
A step after a serving re-layout (``HostState.relayout``: rows joined or left the batch at a
block boundary) runs every row too, as any cold step, but keeps the step count: the batch's
other rows do not repeat the dense warm-up.

Defaults follow the official code:

================================  =================  =========================================
parameter                         default            where the official code sets it
================================  =================  =========================================
``tau``                           0.99 (LLaDA),      ``Config.threshold`` and ``eval.py
                                  0.995 (Dream)      --threshold`` 0.99; ``run.py`` (Dream) 0.995
``num_full_steps``                4                  ``scripts/run_gsm8k.sh`` NUM_FULL_STEPS=4
                                                     (``eval.py`` 8, ``SamplingParams`` 16)
``full_query_interval``           4                  ``engine/model_runner.py prepare_sparse``:
                                                     the whole sequence is queried when
                                                     ``processed_steps <= 4 or % 4 == 0``
``cached_softmax_stats``          False              the attention kernel recomputes the
                                                     normaliser over all keys every step
``refresh_interval``              None               no dense step after the first ones
``refresh_at_block``              False              no dense step at block boundaries
================================  =================  =========================================

The project's own variants are options, each measured against the default in ``dyllm bench``:
``cached_softmax_stats=True`` (update cached softmax statistics over the changed keys only,
O(N A d) instead of O(N^2 d); exact only while a row's query does not move),
``refresh_interval=16`` / ``refresh_at_block=True`` (dense refreshes), and
``full_query_interval=None`` (the prompt stays frozen after the dense steps).

Static shapes: the changed and salient sets are top-C selections (lowest cosine first) with a
capacity C fixed for the step. Selected rows that do not qualify are computed and discarded
(their cache writes are suppressed), so with no overflow a step equals one with exact counts.
Rows that qualify beyond C are the *overflow*, counted on the device; the next step's capacity
grows to cover them (``capacity="auto"``; an int fixes C; ``"full"`` is the whole span, which
never overflows).

A capacity never changes a token by default (``overflow="rerun"``): a step whose counts show an
overflow runs again from the state it started from (the engine keeps a copy of the caches for
the steps that may overflow) with the capacity of the whole span, so every row whose cosine is
below tau is recomputed, as the official engine does (``attention.py``: ``cos_sim_mask`` feeds
``idx_salient_row`` whatever its size). Why this design: the selection stays static (top-C, one
graph per plan key, compiled, CUDA-graphed and exported as before), a step that fits its
capacity costs one copy of the state, and one that does not costs one more step at the full
width, which ``auto`` makes rare by growing C from the measured needs; a per-layer ``torch.cond``
would put both branches, and in-place cache writes, in every step graph.
``overflow="approximate"`` (the project's option, measured in ``dyllm bench``) keeps the step
and approximates the overflow rows (cached MLP output, approximate attention) instead. Exported
runners keep their state in their session and approximate.

``tau`` is compared as the official kernel does (``cos < tau``), whatever its value: ``tau = 1``
leaves out a row whose cosine rounds to 1 and still starts layer 0 from the last step's commits
only. ``every_row=True`` (the project's option, for checking the sparse path; not the method) is
the one way to recompute everything: every real row of the span changed at layer 0 and salient
at every layer without comparing, the capacity the whole span; with ``full_query_interval=1``
(every step queries everything) that is exactly the vanilla forward. It is an option of its own
and not a value of tau because no tau gives it: a cosine of exactly 1 is not below any tau <= 1,
and the official layer 0 recomputes the committed rows only.

``mlp_selection`` says where the MLP's capacity applies. ``"sequence"`` (the default) uses the
per-sequence top-C for the MLP too: one selection per layer, the fewest rows approximated (the
official engine recomputes every salient row). ``"batch"`` selects the MLP rows over the whole
batch at once: the MLP runs on the B * m rows of lowest cosine of all the batch's salient rows,
m sized from the batch's mean need, so a batch pays for the rows that changed and not B times its
busiest sequence (the official engine packs every sequence's salient rows into one varlen batch,
which costs the same); it overflows more often, since a mean moves more from step to step than a
maximum. The next layer's K/V rows stay a per-sequence top-C unless ``kv_selection="batch"``
(with ``mlp_selection="batch"``): then one flat selection per layer, of ``B * m`` rows with m
from the batch's mean need, gives the layer's MLP and the next layer's K/V, and each selected row
attends to its own sequence's keys (the K/V piece runs on the selected rows as one-row
sequences, each with its own sequence's tables). With no overflow all of them give the same
tokens as exact counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import ClassVar

import torch

from dyllm_fx.kernels.dispatch import approx_attention, partial_attention, partial_attention_stats
from dyllm_fx.kernels.salient_rows import cosine_from_stats

from ..pieces import Prologue
from ..rows import bucket_size, mark, select_top, span_rows, take, write_rows
from .base import FULL, HostState, Plan, StepOutput, StepReport, full_step, head_logits, rows_step
from .keys import FullKey, PlanKey, PlanKeyError, RefreshKey
from .params import choice, count, flag, number
from .row import RowPolicy, plan_span_rows, span_plan

# Each selection's counts: rows that qualified (the most of any sequence; for a batch-wide
# selection, the batch's total), rows kept (the most of any sequence), overflow (the sum).
COUNT_KINDS = 3
HISTORY = 4  # sparse steps whose needs size the next capacity
MLP_SELECTIONS = ("sequence", "batch")
OVERFLOWS = (
    "rerun",
    "approximate",
)  # a step whose salient rows exceed its capacity: run again, or approximate
MLP_LEVELS = 3  # a batch-wide MLP capacity: the top-C capacity or one of the 2 powers of two below it


def mlp_levels(capacity: int) -> list[int]:
    """The batch-wide MLP capacities a top-C ``capacity`` allows, smallest first: ``capacity``
    and the powers of two below it (never a fraction of a width that is not a power of two,
    which would give every sequence length its own shapes)."""
    power = 1 << (capacity.bit_length() - 1)  # the largest power of two <= capacity
    if power == capacity:
        power //= 2
    return sorted({capacity} | {max(power >> k, 1) for k in range(MLP_LEVELS - 1)})


def mlp_level(need: int, capacity: int) -> int:
    """The smallest of :func:`mlp_levels` that holds ``need`` rows per sequence (else ``capacity``)."""
    return next((level for level in mlp_levels(capacity) if level >= need), capacity)


# the flat rows option's parameters (one selection over the batch for the MLP and the next K/V)
FLAT_ROWS = MappingProxyType({"mlp_selection": "batch", "kv_selection": "batch"})


@dataclass(frozen=True)
class SparseKey(PlanKey):
    """A sparse step: the ``width``-row span queried (bucketed), top-``capacity`` selections of
    changed / salient rows, softmax statistics ``stats`` (``"exact"`` or ``"cached"``), whether
    it records similarities, and the batch-wide MLP selection's rows per sequence
    (``mlp_capacity``; None: the per-sequence selection). ``flat``: one flat selection of
    B * capacity rows per layer for the MLP and the next K/V (``kv_selection="batch"``)."""

    kind: ClassVar[str] = "sparse"
    SIZES: ClassVar[tuple[str, ...]] = ("width", "capacity", "mlp_capacity")
    width: int | str
    capacity: int | str
    stats: str
    record: bool
    mlp_capacity: int | str | None
    flat: bool = False


def is_flat_key(key: PlanKey) -> bool:
    """Whether a plan key is a flat-rows sparse step (``kv_selection="batch"``: one selection of
    B * m rows per layer, m its ``capacity`` and ``mlp_capacity``)."""
    return isinstance(key, SparseKey) and key.flat


@dataclass
class DyLLMBuffers:
    context: list[torch.Tensor]  # per layer (B, H, L, dv): each row's attention context at its last update
    mlp: list[torch.Tensor]  # per layer (B, L, D): each row's MLP branch output at its last update
    prev_ids: torch.Tensor  # (B, L): the tokens of the previous step (what changed since)
    m: list[torch.Tensor] | None = None  # cached_softmax_stats: per layer (B, H, L) fp32 row max
    l: list[torch.Tensor] | None = None  # and row sum of the softmax
    similarity: list[torch.Tensor] | None = None  # per layer (B, L) fp32, when recording


@dataclass
class FlatRows:
    """A top-(B * m) selection over the whole batch's span rows (the flattened (1, B * W) slot
    space): ``slots`` (1, N) flat slots b * W + s in ascending order, ``valid`` (1, N) which of
    them qualified, ``batch`` (1, N) their sequence and ``rows`` (1, N) their positions in it."""

    slots: torch.Tensor
    valid: torch.Tensor
    batch: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def select(cls, key: torch.Tensor, eligible: torch.Tensor, rows: torch.Tensor, per_sequence: int):
        """The ``B * per_sequence`` eligible slots of largest ``key`` (B, W) in the whole batch."""
        bsz, width = rows.shape
        slots, valid = select_top(key.reshape(1, -1), eligible.reshape(1, -1), bsz * per_sequence)
        batch = torch.div(slots, width, rounding_mode="floor")
        return cls(slots, valid, batch, take(rows.reshape(1, -1), slots, 1))

    def per_sequence(self, values: torch.Tensor, bsz: int, width: int) -> torch.Tensor:
        """``values`` (N, ...) of the selected slots laid out per sequence over the span:
        (B, W, ...), zero (False) at the slots not selected."""
        out = values.new_zeros(bsz * width, *values.shape[1:]).index_put_((self.slots[0],), values)
        return out.view(bsz, width, *values.shape[1:])

    def counts(self, eligible: torch.Tensor) -> torch.Tensor:
        """[rows that qualified in the batch, most kept in one sequence, qualified beyond N]."""
        kept = torch.zeros(eligible.shape[0], dtype=torch.long, device=eligible.device)
        kept.index_add_(0, self.batch[0], self.valid[0].long())
        wanted = eligible.sum()
        return torch.stack([wanted, kept.amax(), wanted - kept.sum()])


class DyLLMPolicy(RowPolicy):
    name = "dyllm"

    def __init__(
        self,
        tau: float = 0.99,
        num_full_steps: int = 4,
        full_query_interval: int | None = 4,
        cached_softmax_stats: bool = False,
        refresh_interval: int | None = None,
        refresh_at_block: bool = False,
        scope: str = "response",
        capacity: int | str = "auto",
        mlp_selection: str = "sequence",
        kv_selection: str = "sequence",
        overflow: str = "rerun",
        every_row: bool = False,
    ):
        self.every_row = flag("every_row", every_row)
        self.overflow = choice("overflow", overflow, OVERFLOWS)
        self.tau = number("tau", tau, 0.0, 1.0, low_open=True, hint=" (DyLLM uses about 0.99 to 0.995)")
        self.num_full_steps = count("num_full_steps", num_full_steps, minimum=1)
        self.full_query_interval = count("full_query_interval", full_query_interval, allow_none=True)
        self.cached_softmax_stats = flag("cached_softmax_stats", cached_softmax_stats)
        self.refresh_interval = count("refresh_interval", refresh_interval, allow_none=True)
        self.refresh_at_block = flag("refresh_at_block", refresh_at_block)
        super().__init__(scope)
        if not (
            capacity in ("auto", "full")
            or (isinstance(capacity, int) and not isinstance(capacity, bool) and capacity >= 1)
        ):
            raise ValueError(f"capacity must be 'auto', 'full' or a row count >= 1; got {capacity!r}")
        self.capacity = capacity
        self.mlp_selection = choice("mlp_selection", mlp_selection, MLP_SELECTIONS)
        self.kv_selection = choice("kv_selection", kv_selection, MLP_SELECTIONS)
        if self.kv_selection == "batch" and self.mlp_selection != "batch":
            raise ValueError(
                "kv_selection='batch' picks one set of rows over the batch for the MLP and the next "
                "layer's K/V: pass mlp_selection='batch' too"
            )
        if self.kv_selection == "batch" and self.cached_softmax_stats:
            raise ValueError(
                "kv_selection='batch' does not combine with cached_softmax_stats=True; drop one of them"
            )
        # whether the MLP rows really are selected batch-wide: ``bind`` turns it off for programs
        # whose MLP reads per-position tables (its rows must then be one sequence's positions)
        self.mlp_batch_wide = self.mlp_selection == "batch"
        self.kv_batch_wide = self.kv_selection == "batch"
        self.record_similarity = False  # set by the engine: fill DyLLMBuffers.similarity
        self.reset()

    def reset(self) -> None:
        self._steps = 0  # steps since the generation started (the official processed_steps - 1)
        self._since_refresh = 0
        self._block_start: int | None = None
        self._stats_ready = False  # cached softmax statistics hold every queried row's current values
        self._needs: list[int] = []  # rows recent sparse steps wanted in a selection (most of any layer)
        self._mlp_needs: list[int] = []  # and rows per sequence the batch-wide MLP selections wanted

    def bind(self, program) -> None:
        self.mlp_batch_wide = self.mlp_selection == "batch" and not any(p.tables for p in program.mlp)
        self.kv_batch_wide = self.kv_selection == "batch" and self.mlp_batch_wide

    # --- buffers ------------------------------------------------------------------------------

    def allocate(self, program, batch, seq_len, device) -> DyLLMBuffers:
        heads = program.attn_heads
        context = [
            torch.zeros(batch, heads[i], seq_len, v[1], dtype=program.kv_dtype, device=device)
            for i, (_, v) in enumerate(program.kv_shapes)
        ]
        mlp = [
            torch.zeros(batch, seq_len, program.hidden_size, dtype=program.hidden_dtype, device=device)
            for _ in heads
        ]
        prev = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
        stats = None
        if self.cached_softmax_stats:
            stats = [[torch.zeros(batch, h, seq_len, device=device) for h in heads] for _ in range(2)]
        sim = (
            [torch.full((batch, seq_len), float("nan"), device=device) for _ in heads]
            if self.record_similarity
            else None
        )
        return DyLLMBuffers(context, mlp, prev, *(stats or (None, None)), similarity=sim)

    def buffer_nbytes(self, program, batch, seq_len) -> int:
        kv_item = torch.empty((), dtype=program.kv_dtype).element_size()
        h_item = torch.empty((), dtype=program.hidden_dtype).element_size()
        total = batch * seq_len * 8  # prev_ids
        for heads, (_, v) in zip(program.attn_heads, program.kv_shapes):
            total += batch * heads * seq_len * v[1] * kv_item  # context
            total += batch * seq_len * program.hidden_size * h_item  # MLP output
            if self.cached_softmax_stats:
                total += 2 * batch * heads * seq_len * 4
            if self.record_similarity:
                total += batch * seq_len * 4
        return total

    # --- host: the plan ------------------------------------------------------------------------

    def _query_span(self, scope: tuple[int, int], seq_len: int, full_query: bool) -> tuple[int, int]:
        """The rows a sparse step queries: the scope's span ``scope``, or every row at a full-query
        step (not under a block cache, whose scope bounds every step)."""
        return (0, seq_len) if full_query and not self._composed else scope

    def _width(self, start: int, end: int, seq_len: int, full_query: bool = False) -> int:
        """A step's width for the span [start, end): bucketed for a suffix span (it shrinks block
        by block), exact otherwise."""
        return bucket_size(end - start, seq_len) if self.scope == "suffix" and not full_query else end - start

    def plan(self, host: HostState) -> Plan:
        if host.cold and not host.relayout:  # a re-laid-out batch keeps its step count
            self.reset()
        step = self._steps
        self._steps += 1
        new_block = host.block_start is not None and host.block_start != self._block_start
        self._block_start = host.block_start
        if host.cold or (new_block and (self._composed or self.refresh_at_block)):
            return self._refresh(FULL)
        dense = step < self.num_full_steps or (
            self.refresh_interval is not None and self._since_refresh >= self.refresh_interval
        )
        if dense:
            # under a block cache the rows outside its scope are the cache's own: a dense step
            # recomputes the scope, as the block cache's own step does
            return self._refresh(self._scope_refresh(host) if self._composed else FULL)
        self._since_refresh += 1
        n = step + 1  # the official processed_steps
        interval = self.full_query_interval
        full_query = interval is not None and (n <= interval or n % interval == 0)
        start, end = self._query_span(host.span(self.scope), host.seq_len, full_query)
        width = self._width(start, end, host.seq_len, full_query)
        if self.kv_batch_wide:
            capacity = mlp_capacity = self._flat_capacity(width, host)
        else:
            capacity = self._capacity(width, host)
            mlp_capacity = self._mlp_capacity(width, capacity, host)
        stats = "cached" if self.cached_softmax_stats and self._stats_ready and not full_query else "exact"
        self._stats_ready = True
        # flat: one flat selection of B * capacity rows per layer
        key = SparseKey(width, capacity, stats, self.record_similarity, mlp_capacity, self.kv_batch_wide)
        return span_plan(key, host, start, end, width=width, batch=host.batch)

    def _scope_refresh(self, host: HostState) -> Plan:
        """A dense step over the scope's rows only (every row the block cache lets run)."""
        start, end = host.span(self.scope)
        return span_plan(
            RefreshKey(self._width(start, end, host.seq_len)), host, start, end, active=end - start
        )

    def plan_keys(self, layout, seq_len, n_layers, shift) -> set[PlanKey]:
        if self.kv_batch_wide:
            raise PlanKeyError(
                "DyLLM's flat row selection (kv_selection='batch') is not exported (its steps index the "
                "caches by (sequence, row) pairs); export with kv_selection='sequence', the default"
            )
        interval = self.full_query_interval
        # which kinds of sparse step the schedule can take (over-approximated)
        query_modes = ([True] if interval is not None else []) + ([False] if interval != 1 else [])
        keys: set[PlanKey] = {FullKey()}
        for k in range(layout.num_blocks):
            scope = self.layout_span(layout, seq_len, k)
            for full_query in query_modes:
                width = self._width(*self._query_span(scope, seq_len, full_query), seq_len, full_query)
                stats = ["exact"] + (["cached"] if self.cached_softmax_stats and not full_query else [])
                for capacity in self._capacity_choices(width, minimum=8):
                    for mlp in self._mlp_capacity_choices(capacity):
                        keys.update(SparseKey(width, capacity, mode, False, mlp) for mode in stats)
            # composed: the dense warm-up steps and the periodic refreshes recompute the scope
            if self._composed and (self.refresh_interval is not None or self.num_full_steps > 1):
                keys.add(RefreshKey(self._width(*scope, seq_len)))
        return keys

    def _refresh(self, plan: Plan) -> Plan:
        self._since_refresh = 1
        self._stats_ready = False
        self._needs = []  # the first steps after a refresh are measured afresh
        self._mlp_needs = []
        return plan

    def _capacity(self, width: int, host: HostState) -> int:
        """The step's top-C capacity. ``auto``: the whole span at the first sparse step after a
        dense one (nothing measured yet, and contexts move most right after a refresh); then
        the most rows any of the last ``HISTORY`` steps wanted, plus half of that as headroom,
        bucketed: the need moves a lot from step to step, and a row beyond the capacity is
        approximated where the official code would recompute it."""
        return self._sized(width, host, self._needs, minimum=8)

    def _sized(self, width: int, host: HostState, needs: list[int], minimum: int) -> int:
        """A selection's capacity from ``needs`` (its rows wanted by recent sparse steps): the
        span, a fixed capacity, or the largest recent need (at least the most tokens a sequence
        committed last step) plus half of it as headroom, bucketed from ``minimum``."""
        fixed = self._fixed_capacity(width)
        if fixed is not None:
            return fixed
        if not needs:
            return width
        need = max(*needs[-HISTORY:], host.last_committed)
        return bucket_size(need + (need + 1) // 2, width, minimum)

    def _fixed_capacity(self, width: int) -> int | None:
        """The capacity when it does not follow the needs (``"full"``, ``every_row`` with
        ``"auto"``, an int), else None."""
        if self.capacity == "full" or (self.every_row and self.capacity == "auto"):
            return width
        if isinstance(self.capacity, int):
            return min(self.capacity, width)
        return None

    def _capacity_choices(self, width: int, minimum: int) -> set[int]:
        """Every value :meth:`_sized` can return for a span of ``width`` rows."""
        fixed = self._fixed_capacity(width)
        if fixed is not None:
            return {fixed}
        return {width} | {bucket_size(n, width, minimum) for n in range(width + 1)}

    def _mlp_capacity(self, width: int, capacity: int, host: HostState) -> int | None:
        """Rows per sequence of the batch-wide MLP selection (it keeps batch * this many rows);
        None when the MLP takes the per-sequence selection (``mlp_selection="sequence"``, or an
        MLP that reads per-position tables, see :meth:`bind`). From the batch's mean need over the last
        ``HISTORY`` steps plus half of it as headroom, as :meth:`_capacity`, rounded up to one of
        :func:`mlp_levels` (``capacity``, ``capacity / 2``, ``capacity / 4`` for a power of two): a
        few levels per capacity, so that the two capacities add few step shapes (compiled graphs,
        exported branches)."""
        if not self.mlp_batch_wide:
            return None
        if self._mlp_fixed() or not self._mlp_needs:
            return capacity  # a fixed capacity, or nothing measured since the last dense step
        need = max(self._mlp_needs[-HISTORY:])
        return mlp_level(need + (need + 1) // 2, capacity)

    def _mlp_fixed(self) -> bool:
        """Whether the batch-wide MLP capacity is always the top-C capacity."""
        return self.capacity != "auto" or self.every_row

    def _mlp_capacity_choices(self, capacity: int) -> set[int | None]:
        """Every value :meth:`_mlp_capacity` can return at top-C capacity ``capacity``."""
        if not self.mlp_batch_wide:
            return {None}
        return {capacity} if self._mlp_fixed() else set(mlp_levels(capacity))

    def _flat_capacity(self, width: int, host: HostState) -> int:
        """Rows per sequence of the flat selection (``kv_selection="batch"``: it keeps batch * this
        many rows): the whole span at the first sparse step after a dense one; then the batch's
        mean need over the last ``HISTORY`` steps, at least the most tokens a sequence committed
        last step (layer 0's changed rows), plus half of it as headroom, bucketed."""
        return self._sized(width, host, self._mlp_needs, minimum=2)

    def may_rerun(self, plan: Plan) -> bool:
        if self.overflow != "rerun" or plan.kind != "sparse":
            return False
        width, key = plan.note["width"], plan.key
        return key.capacity < width or (key.mlp_capacity is not None and key.mlp_capacity < width)

    def rerun(self, plan: Plan, counts: list[int] | None) -> Plan | None:
        """The same step at the whole span's capacity when any selection overflowed."""
        if not self.may_rerun(plan) or not any(counts[2::COUNT_KINDS]):
            return None
        width, key = plan.note["width"], plan.key
        full = replace(key, capacity=width, mlp_capacity=None if key.mlp_capacity is None else width)
        return Plan(full, plan.rows, plan.span_start, plan.span_len, note=plan.note)

    def observe(self, plan, counts, n_layers, seq_len) -> StepReport:
        if plan.kind != "sparse":
            return StepReport([plan.note.get("active", seq_len)] * n_layers)
        need, kept, overflow = counts[0::COUNT_KINDS], counts[1::COUNT_KINDS], counts[2::COUNT_KINDS]
        extra = {"changed": kept[0]}
        if is_flat_key(plan.key):
            # one flat selection per layer (entry 0: layer 0's changed rows); the need is the
            # batch's total, kept the most of any sequence
            batch = plan.note["batch"]
            self._mlp_needs.append(max(-(-total // batch) for total in need))
            active = kept[1:]
            extra["mlp_capacity"] = plan.key.mlp_capacity
        elif plan.key.mlp_capacity is None:
            # per sequence: entry 0 is layer 0's changed rows (new K/V); entry l + 1 is layer l's
            # salient rows (its MLP and layer l + 1's K/V)
            self._needs.append(max(need))
            active = kept[1:]
        else:
            # batch-wide MLP: entries 0 .. n - 1 are each layer's K/V rows, then one entry per
            # layer for its MLP selection, whose need is the batch's total
            self._needs.append(max(need[:n_layers]))
            batch = plan.note["batch"]
            self._mlp_needs.append(max(-(-total // batch) for total in need[n_layers:]))
            active = kept[n_layers:]
            extra["mlp_capacity"] = plan.key.mlp_capacity
        return StepReport(list(active), capacity=plan.key.capacity, overflow=sum(overflow), extra=extra)

    def similarity(self, buffers: DyLLMBuffers, plan: Plan):
        return buffers.similarity if plan.kind == "sparse" and buffers.similarity is not None else None

    # --- device: the step ----------------------------------------------------------------------

    def recorder(self, buffers: DyLLMBuffers):
        def record(r):
            write_rows(buffers.context[r.layer], r.rows, r.context, 2)
            write_rows(buffers.mlp[r.layer], r.rows, r.branch, 1)

        return record

    def step(self, pieces, plan, inp, cache, buffers: DyLLMBuffers) -> StepOutput:
        if plan.kind == "full":
            out = full_step(pieces, inp, cache, self.recorder(buffers))
        elif plan.kind == "refresh":
            out = rows_step(pieces, inp, cache, plan_span_rows(plan, inp), self.recorder(buffers))
        else:
            out = self._sparse_step(pieces, plan, inp, cache, buffers)
        buffers.prev_ids.copy_(inp.input_ids)
        return out

    def _sparse_step(self, pieces, plan, inp, cache, buffers: DyLLMBuffers) -> StepOutput:
        if is_flat_key(plan.key):
            return self._flat_sparse_step(pieces, plan, inp, cache, buffers)
        key = plan.key
        capacity, stats_mode, record, mlp_capacity = key.capacity, key.stats, key.record, key.mlp_capacity
        rows, in_span, real, changed, pro = self._sparse_start(pieces, inp, buffers, key.width)
        x = take(pro.h0, rows, 1)
        tau = self.tau if inp.tau is None else inp.tau  # a tensor in exported graphs (an input)
        slots, valid = select_top(changed.float(), changed, capacity)
        counts, mlp_counts = [_counts(changed, valid)], []
        n_layers = pieces.n_layers
        batch_wide = mlp_capacity is not None
        if batch_wide and any(map(pieces.mlp_reads_tables, range(n_layers))):
            raise ValueError(
                "a batch-wide MLP plan for an MLP that reads per-position tables: bind the policy to "
                "the program (StepEngine does) before planning"
            )
        for layer in range(n_layers):
            q, mask = pieces.query(layer, x, rows, pro)
            ctx, cos = self._attention(
                pieces, layer, x, rows, slots, valid, q, mask, pro, cache, buffers, stats_mode
            )
            h_mid, salient = self._after_attention(
                pieces, layer, x, rows, in_span, real, ctx, cos, tau, record, cache, buffers
            )
            if not batch_wide or layer < n_layers - 1:
                # the next layer's K/V rows, and per sequence also this layer's MLP rows
                slots, valid = select_top(-cos, salient, capacity)  # the lowest cosines first
                counts.append(_counts(salient, valid))
            if batch_wide:
                mlp_counts.append(
                    self._mlp_batch_wide(
                        pieces, layer, h_mid, rows, cos, salient, mlp_capacity, pro, cache, buffers
                    )
                )
            else:
                s_rows = take(rows, slots, 1)
                fresh = pieces.mlp(layer, take(h_mid, slots, 1), s_rows, pro)
                write_rows(buffers.mlp[layer], s_rows, fresh, 1, valid)
                mark(cache.activity, layer, s_rows, 1.0, valid)
            x = h_mid + take(buffers.mlp[layer], rows, 1)
        write_rows(cache.hidden, rows, x, 1)
        logits = head_logits(pieces, cache, inp.logit_positions)
        return StepOutput(logits, counts=torch.cat(counts + mlp_counts))

    def _sparse_start(self, pieces, inp, buffers: DyLLMBuffers, width: int):
        """(rows, in_span, real, changed, prologue) of a sparse step: the span's rows (B, W), which
        of them are real tokens (left padding never changes), and layer 0's changed rows: the
        tokens that changed, or every row under ``every_row`` or when the first hidden state also
        reads the last step's output (self-conditioning moves every row's input; the official
        DiffusionGemma engine starts layer 0 from every canvas row too)."""
        rows, in_span = span_rows(inp.span_start, inp.span_len, width)
        real = take(inp.attention_mask, rows, 1).bool() & in_span
        pro = pieces.prologue(inp.input_ids, inp.attention_mask, inp.position_ids, *inp.extras)
        if self.every_row or pieces.h0_reads_state:
            return rows, in_span, real, real, pro
        moved = take(inp.input_ids, rows, 1) != take(buffers.prev_ids, rows, 1)
        return rows, in_span, real, real & moved, pro

    def _after_attention(self, pieces, layer, x, rows, in_span, real, ctx, cos, tau, record, cache, buffers):
        """Cache the queried rows' new contexts (and similarities, when recording), run o_proj and
        the residual; (h_mid, the salient rows: real rows whose context cosine is below tau)."""
        write_rows(buffers.context[layer], rows, ctx, 2)
        if record:
            buffers.similarity[layer].fill_(float("nan"))
            write_rows(buffers.similarity[layer], rows, torch.where(in_span, cos, float("nan")), 1)
        mark(cache.activity, layer, rows, 0.5, in_span)
        salient = real if self.every_row else real & (cos < tau)
        return pieces.post(layer, x, ctx), salient

    def _mlp_batch_wide(self, pieces, layer, h_mid, rows, cos, salient, per_sequence, pro, cache, buffers):
        """The MLP of the batch's ``B * per_sequence`` salient rows of lowest cosine, whichever
        sequences they are in, written to the MLP cache; returns the selection's counts."""
        flat = FlatRows.select(-cos, salient, rows, per_sequence)
        self._flat_mlp(pieces, layer, h_mid, flat, pro, cache, buffers)
        return flat.counts(salient)

    def _flat_mlp(self, pieces, layer, h_mid, flat: FlatRows, pro, cache, buffers):
        """The MLP of the flat selection's rows, written to the MLP cache (viewed flat)."""
        bsz, seq_len = buffers.mlp[layer].shape[:2]
        fresh = pieces.mlp(layer, take(h_mid.reshape(1, -1, h_mid.shape[-1]), flat.slots, 1), flat.rows, pro)
        at = flat.batch * seq_len + flat.rows  # (1, N) into the flattened (1, B * L) caches
        write_rows(buffers.mlp[layer].view(1, bsz * seq_len, -1), at, fresh, 1, flat.valid)
        if cache.activity is not None:
            mark(cache.activity.view(cache.activity.shape[0], 1, -1), layer, at, 1.0, flat.valid)

    def _flat_sparse_step(self, pieces, plan, inp, cache, buffers: DyLLMBuffers) -> StepOutput:
        """The sparse step with one flat selection per layer (``kv_selection="batch"``): the
        batch's ``B * m`` salient rows of lowest cosine, whichever sequences they are in, get the
        layer's MLP and the next layer's K/V; layer 0's are the batch's changed tokens. The
        attention stays per sequence: each selected row attends to its own sequence's keys."""
        per_sequence, record = plan.key.capacity, plan.key.record
        rows, in_span, real, changed, pro = self._sparse_start(pieces, inp, buffers, plan.key.width)
        x = take(pro.h0, rows, 1)
        tau = self.tau if inp.tau is None else inp.tau  # a tensor in exported graphs (an input)
        flat = FlatRows.select(changed.float(), changed, rows, per_sequence)
        counts = [flat.counts(changed)]
        for layer in range(pieces.n_layers):
            q, mask = pieces.query(layer, x, rows, pro)
            ctx, cos = self._flat_attention(pieces, layer, x, rows, flat, q, mask, pro, cache, buffers)
            h_mid, salient = self._after_attention(
                pieces, layer, x, rows, in_span, real, ctx, cos, tau, record, cache, buffers
            )
            flat = FlatRows.select(-cos, salient, rows, per_sequence)  # the lowest cosines first
            counts.append(flat.counts(salient))
            self._flat_mlp(pieces, layer, h_mid, flat, pro, cache, buffers)
            x = h_mid + take(buffers.mlp[layer], rows, 1)
        write_rows(cache.hidden, rows, x, 1)
        logits = head_logits(pieces, cache, inp.logit_positions)
        return StepOutput(logits, counts=torch.cat(counts))

    def _flat_attention(self, pieces, layer, x, rows, flat: FlatRows, q, mask, pro, cache, buffers):
        """:meth:`_attention` for a flat selection of changed rows: their new K/V (the K/V piece
        runs on N one-row sequences, each reading its own sequence's tables), their exact
        attention against their own sequence's keys, then the approximate update of every
        queried row with the changed rows laid out per sequence over the span (A = W)."""
        bsz, width = rows.shape
        n = flat.slots.shape[1]
        b, r, valid = flat.batch[0], flat.rows[0], flat.valid[0]  # (N,)
        own = Prologue(pro.h0, [t.index_select(0, b) if t.shape[0] == bsz else t for t in pro.tables])
        x_sel = take(x.reshape(1, bsz * width, -1), flat.slots, 1)
        k_new, v_new = pieces.kv(layer, x_sel.view(n, 1, -1), r.view(n, 1), own)  # (N, KV, 1, d)
        # (B, L, KV, d) views of the caches: [b, r] addresses one row's K/V of every head
        k_rows, v_rows = cache.k[layer].permute(0, 2, 1, 3), cache.v[layer].permute(0, 2, 1, 3)
        k_old, v_old = k_rows[b, r], v_rows[b, r]  # (N, KV, d)
        keep = valid[:, None, None]
        k_now = torch.where(keep, k_new[:, :, 0], k_old)
        v_now = torch.where(keep, v_new[:, :, 0], v_old)
        k_rows.index_put_((b, r), k_now)
        v_rows.index_put_((b, r), v_now)
        keys, values, offset = pieces.keys(layer, pro, cache)
        scale = pieces.scale(layer)
        heads = q.shape[1]
        q_sel = q.transpose(1, 2).reshape(bsz * width, heads, -1).index_select(0, flat.slots[0])
        own_mask = mask.index_select(0, b) if mask is not None and mask.shape[0] == bsz else mask
        exact, _, _ = partial_attention_stats(
            q_sel[:, :, None],
            keys.index_select(0, b),
            values.index_select(0, b),
            r.view(n, 1),
            own_mask,
            scale,
        )  # (N, H, 1, dv)
        # the changed rows laid out per sequence: slot s of sequence b is span row s
        chosen = flat.per_sequence(valid, bsz, width)
        marked = torch.where(chosen, rows, -1)
        marked_keys = torch.where(chosen, rows + offset, -1) if offset else marked
        dv = flat.per_sequence(v_now - v_old, bsz, width).transpose(1, 2)  # (B, KV, W, d)
        exact_rows = flat.per_sequence(exact[:, :, 0], bsz, width).transpose(1, 2)  # (B, H, W, dv)
        cached_ctx = take(buffers.context[layer], rows, 2)
        ctx, stats, _, _ = approx_attention(
            q, keys, marked_keys, dv, cached_ctx, marked, exact_rows, mask, scale, q_rows=rows
        )
        return ctx, _cosine(pieces, stats)

    def _attention(self, pieces, layer, x, rows, slots, valid, q, mask, pro, cache, buffers, stats_mode):
        """New K/V for the changed rows (``slots`` where ``valid``), their exact attention, and
        the approximate update of every queried row: (context (B, H, W, dv), cosine (B, W))."""
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        c_rows = take(rows, slots, 1)
        k_new, v_new = pieces.kv(layer, take(x, slots, 1), c_rows, pro)
        k_old, v_old = take(k_cache, c_rows, 2), take(v_cache, c_rows, 2)
        keep = valid[:, None, :, None]
        v_new = torch.where(keep, v_new, v_old)
        write_rows(k_cache, c_rows, torch.where(keep, k_new, k_old), 2)
        write_rows(v_cache, c_rows, v_new, 2)
        # the keys attention reads: a key prefix (an encoder's cache; none for most models) in
        # front of the cached rows, so row r is key offset + r
        keys, values, offset = pieces.keys(layer, pro, cache)
        scale = pieces.scale(layer)
        q_changed = take(q, slots, 2)
        marked = torch.where(valid, c_rows, -1)  # -1: not a changed row (skipped by the op)
        marked_keys = torch.where(valid, c_rows + offset, -1) if offset else marked
        cached_ctx = take(buffers.context[layer], rows, 2)
        if stats_mode == "cached":
            exact, m_exact, l_exact = partial_attention_stats(q_changed, keys, values, c_rows, mask, scale)
            m_old, l_old = take(buffers.m[layer], rows, 2), take(buffers.l[layer], rows, 2)
            extra = (k_old, m_old, l_old)
        else:
            exact = partial_attention(q_changed, keys, values, c_rows, mask, scale)
            extra = (None, None, None)
        ctx, stats, m, l = approx_attention(
            q, keys, marked_keys, v_new - v_old, cached_ctx, marked, exact, mask, scale, *extra, q_rows=rows
        )
        if buffers.m is not None:
            write_rows(buffers.m[layer], rows, m, 2)
            write_rows(buffers.l[layer], rows, l, 2)
            if stats_mode == "cached":  # the changed rows' statistics are exact (their own pass)
                write_rows(buffers.m[layer], c_rows, m_exact, 2, valid)
                write_rows(buffers.l[layer], c_rows, l_exact, 2, valid)
        return ctx, _cosine(pieces, stats)


def _cosine(pieces, stats: torch.Tensor) -> torch.Tensor:
    """(B, W) cosine of each row's new context to its cached one, from the kernel's per-row sums
    over this rank's heads ([dot, |new|^2, |cached|^2]), summed over a tensor-parallel model's
    ranks first (one all-reduce of three values per row, as DyLLM's engine does)."""
    stats = pieces.sum_over_shards(stats)
    return cosine_from_stats(stats[..., 0], stats[..., 1], stats[..., 2])


def _counts(wanted: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[most rows any batch element wanted, most it kept, rows wanted beyond the capacity]."""
    per_row = wanted.sum(1)
    kept = valid.sum(1)
    return torch.stack([per_row.amax(), kept.amax(), (per_row - kept).sum()])


__all__ = ["COUNT_KINDS", "OVERFLOWS", "FLAT_ROWS", "DyLLMBuffers", "DyLLMPolicy", "SparseKey", "is_flat_key"]
