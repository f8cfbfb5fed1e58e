"""``es_dllm``: early skipping of unimportant rows (ES-dLLM, arXiv 2603.10088; official code
zhuzj19/ES-dLLM).

Each step computes a *window* of rows, the current block, over a dual cache (K/V of every other
row stay as an earlier step wrote them). Every row of the window runs the first layers; at each
skip layer the rows still running are scored

    importance = alpha * confidence + (1 - alpha) * variation  (+ bonuses)

and only the top k go on. ``variation`` is how much the row's tensor at that layer (its hidden
state after the layer, or its query / key / value before the layer's attention) moved since the
row last ran it: mean |x - x_cached| / (RMS(x_cached) + 1e-6), divided by max(its largest value
over the scored rows, 1). ``confidence`` is the sampler's top probability at the row in the
last step that produced it (0 once the row's token is decoded). The bonuses keep the rows the
sampler is about to need: +2 for the two most confident rows (when alpha > 0), +5 for the
leftmost masked row of the block, +3 for the rows decoded at the previous step (when alpha < 1).
Rows that skipped a layer get no logits this step: the sampler commits only rows that ran every
layer (``StepOutput.eligible``).

Defaults follow the official code (``config.py``, ``generate.py``, ``scripts/eval_*.sh``):

=======================  ====================================  ===============================
parameter                default                               official source
=======================  ====================================  ===============================
``variation``            ``"hidden"``                          ``ESdLLM_mode="HiddenState"``
``alpha``                0.5                                   ``importance_score_alpha``
``proportion_steps``     ((1, 0), (0.5, 0.125), (0.25, 0.25))  ``proportion_steps``; layers from
                                                               depth 1/8 keep 50 %, from 1/4
                                                               25 % (32 layers: 4 and 8)
``block_update_freq``    16 (LLaDA), 8 (Dream)                 gsm8k rows of ``eval_*.sh``
``prompt_update_freq``   64                                    idem
``scope``                ``"block"``                           ``forward_start/end_index``
``delay_eos``            True                                  ``delay_eos_generation``
                                                               (``eval.py``, ``config.py``)
=======================  ====================================  ===============================

Kept count at a skip layer: ``max(int(p * window), min(last_decode_cnt + 2, block_length))``.
The window is the current block; at a block's first step it starts at the leftmost row the
previous step decoded (per prompt; the official code takes the batch's leftmost, which makes a
prompt's tokens depend on its batch). Every ``block_update_freq`` steps the window is recomputed without
skipping, every ``prompt_update_freq`` steps ``[0, block end)`` is; the first step of a
generation computes everything. The hidden-state snapshot of a skip layer is written at every
step for the rows that leave the layer (all of them where the floor keeps every row), as the
official ``update_hidden_state``. With Dream's shifted logits every row is the logit row of the
next token.

Delayed EOS (``generate.py``, ``sample_tokens_LLaDA`` / ``sample_tokens_Dream``): a masked row
whose prediction is EOS while the response has no EOS yet and its left neighbour is still masked
gets confidence 0, so it is not committed at this step (``StepOutput.eligible``). LLaDA's sampler
stores that 0 for later importance scores, Dream's stores the probability (it zeroes after the
scatter); both are followed. ``delay_eos=False`` switches the rule off. The official Dream loop
commits one token per step with the top probability: ``generate(..., alg="maskgit_plus",
schedule="even")`` gives its tokens (``tests/test_official_conformance.py``).

The project's variants are options: ``variation="key" | "value" | "query"`` (scored before the
skip layer's attention, as the official code does for those modes), ``scope="response"`` (the
whole response is the window) and explicit ``skip_layers`` / ``keep`` instead of the depth
layout. ``keep=1.0`` at every skip layer keeps all rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from dyllm_fx.errors import UsageError
from dyllm_fx.kernels.dispatch import partial_attention
from dyllm_fx.vocab_parallel import top_probability, vocab_argmax

from ..rows import bucket_size, mark, select_top, span_rows, take, write_rows
from .base import FULL, HostState, Plan, StepOutput, StepReport, full_step, head_logits, rows_step
from .keys import FullKey, PlanKey, RefreshKey, map_size
from .params import choice, count, flag, number
from .row import RowPolicy, plan_span_rows

VARIATIONS = ("hidden", "key", "value", "query")
OFFICIAL_LAYOUT = ((1.0, 0.0), (0.5, 0.125), (0.25, 0.25))
LEFTMOST_BONUS, LAST_DECODED_BONUS, TOP2_BONUS = 5.0, 3.0, 2.0


def skip_layout(proportion_steps, n_layers: int) -> list[tuple[int, float]]:
    """The official depth layout: (layer, kept fraction) for each layer where the fraction
    changes. Layer i keeps the fraction p of the last (p, s) with i >= s * n_layers."""
    fractions = [[p for p, s in proportion_steps if i >= s * n_layers][-1] for i in range(n_layers)]
    return [(i, f) for i, f in enumerate(fractions) if f != (fractions[i - 1] if i else 1.0)]


def variation(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """(B, A): mean |new - old| / (RMS(old) + 1e-6) over the feature dim of (B, A, F) tensors,
    divided by max(its largest value over the rows, 1) (the official normalisation)."""
    new, old = new.float(), old.float()
    rms = old.norm(dim=-1) / math.sqrt(old.shape[-1]) + 1e-6
    diff = (new - old).abs().mean(-1) / rms
    return diff / diff.amax(-1, keepdim=True).clamp_min(1.0)


def importance(confidence, change, alpha: float, live: torch.Tensor, bonus: torch.Tensor) -> torch.Tensor:
    """alpha * confidence + (1 - alpha) * change, +2 on the two most confident live rows when
    alpha > 0, plus the positional ``bonus`` (all (B, A))."""
    score = alpha * confidence + (1 - alpha) * change
    if alpha > 0:
        top2, ok = select_top(confidence, live, 2)
        score = score + torch.zeros_like(score).scatter_(1, top2, TOP2_BONUS * ok.float())
    return score + bonus


def _features(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, A, d) -> (B, A, heads * d)."""
    return t.transpose(1, 2).flatten(2)


@dataclass(frozen=True)
class SkipKey(PlanKey):
    """A window of ``width`` rows (bucketed); at each skip layer of ``selections`` ((layer,
    kept rows) pairs, where the count changes) only the ``kept`` most important rows go on."""

    kind: ClassVar[str] = "skip"
    SIZES: ClassVar[tuple[str, ...]] = ("width",)
    width: int | str
    selections: tuple[tuple[int, int | str], ...]

    def map_sizes(self, fn) -> PlanKey:
        kept = tuple((layer, map_size(n, fn)) for layer, n in self.selections)
        return SkipKey(map_size(self.width, fn), kept)


@lru_cache(maxsize=4096)
def kept_counts(
    layers: tuple[tuple[int, float], ...], window: int, floor: int
) -> tuple[tuple[int, int], ...]:
    """(skip layer, rows kept) where the count changes, for a ``window``-row window: a layer of
    ``layers`` ((layer, kept fraction or count)) keeps ``max(int(p * window), floor)`` rows, never
    more than the layer before."""
    current, selections = window, []
    for layer, keep in layers:
        kept = max(int(keep * window) if keep <= 1 else int(keep), floor)
        kept = min(kept, current)
        if kept != current:
            selections.append((layer, kept))
            current = kept
    return tuple(selections)


@dataclass
class ESDLLMBuffers:
    confidence: torch.Tensor  # (B, L) fp32: each row's confidence when it last produced logits
    prev_ids: torch.Tensor  # (B, L) the previous step's tokens (what it decoded)
    response: torch.Tensor  # (B, L) bool: the rows masked when the generation started
    snapshot: dict[int, torch.Tensor]  # skip layer -> (B, L, D) hidden / (B, H, L, d) query


class ESDLLMPolicy(RowPolicy):
    name = "es_dllm"

    def __init__(
        self,
        proportion_steps: Sequence[Sequence[float]] = OFFICIAL_LAYOUT,
        alpha: float = 0.5,
        variation: str = "hidden",
        block_update_freq: int = 16,
        prompt_update_freq: int = 64,
        scope: str = "block",
        skip_layers: Sequence[int] | None = None,
        keep: Sequence[float] | float | None = None,
        delay_eos: bool = True,
    ):
        self.delay_eos = flag("delay_eos", delay_eos)
        self.alpha = number("alpha", alpha, 0.0, 1.0)
        self.variation = choice("variation", variation, VARIATIONS)
        self.block_update_freq = count("block_update_freq", block_update_freq)
        self.prompt_update_freq = count("prompt_update_freq", prompt_update_freq)
        super().__init__(scope)
        self.proportion_steps = tuple(
            (number("proportion", p, 0.0, 1.0, low_open=True), number("depth", s, 0.0, 1.0))
            for p, s in proportion_steps
        )
        if not self.proportion_steps or self.proportion_steps[0][1] != 0.0:
            raise ValueError(
                f"proportion_steps must start with a (fraction, 0.0) entry; got {proportion_steps}"
            )
        self.explicit = None
        if skip_layers is not None or keep is not None:
            self.explicit = _explicit_layout(skip_layers, keep)
        self.reset()

    def reset(self) -> None:
        self._block_start: int | None = None
        self._in_block = 0
        self._steps = 0

    def check_model(self, n_layers: int) -> None:
        self.layout(n_layers)

    def layout(self, n_layers: int) -> list[tuple[int, float]]:
        """(skip layer, kept fraction or row count) for a model of ``n_layers`` layers."""
        if self.explicit is None:
            return skip_layout(self.proportion_steps, n_layers)
        if self.explicit[-1][0] >= n_layers:
            raise ValueError(
                f"skip layer {self.explicit[-1][0]} does not exist: the model has {n_layers} layers; "
                f"pass skip_layers with indices below {n_layers}, e.g. skip_layers=({max(n_layers // 4, 0)},)"
            )
        return list(self.explicit)

    # --- buffers ------------------------------------------------------------------------------

    def _snapshot_shape(
        self, program, layer: int, batch: int, seq_len: int
    ) -> tuple[tuple[int, ...], torch.dtype]:
        if self.variation == "hidden":
            return (batch, seq_len, program.hidden_size), program.hidden_dtype
        d = program.kv_shapes[layer][0][1]
        return (batch, program.attn_heads[layer], seq_len, d), program.kv_dtype

    def _snapshot_layers(self, program) -> list[int]:
        # key / value variations compare with the K/V cache itself
        if self.variation in ("key", "value"):
            return []
        return [layer for layer, _ in self.layout(len(program.kv_shapes))]

    def allocate(self, program, batch, seq_len, device) -> ESDLLMBuffers:
        if getattr(program, "tensor_parallel_group", None) and self.variation != "hidden":
            # the hidden state is whole on every rank; a query / key / value variation would be
            # this rank's heads only, and the ranks would keep different rows
            raise UsageError(
                f"es_dllm variation={self.variation!r} reads per-head tensors, which a tensor-parallel "
                "shard holds only part of; use the default variation='hidden' with tensor_parallel_size > 1"
            )
        snapshot = {}
        for layer in self._snapshot_layers(program):
            shape, dtype = self._snapshot_shape(program, layer, batch, seq_len)
            snapshot[layer] = torch.zeros(shape, dtype=dtype, device=device)
        return ESDLLMBuffers(
            torch.zeros(batch, seq_len, device=device),
            torch.zeros(batch, seq_len, dtype=torch.long, device=device),
            torch.zeros(batch, seq_len, dtype=torch.bool, device=device),
            snapshot,
        )

    def buffer_nbytes(self, program, batch, seq_len) -> int:
        total = batch * seq_len * (4 + 8 + 1)
        for layer in self._snapshot_layers(program):
            shape, dtype = self._snapshot_shape(program, layer, batch, seq_len)
            total += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return total

    # --- host: the plan ------------------------------------------------------------------------

    def _bounds(self, start: int, end: int, shift: int) -> tuple[int, int]:
        """The window [start, end), in logit rows, of the scope span [start, end)."""
        if self.scope != "all":
            start -= shift
        if self.scope == "block":
            end -= shift
        return max(start, 0), end

    def _window(self, host: HostState, new_block: bool, prompt: bool) -> tuple[list[int], int]:
        """(each batch element's window start, the common window end), in logit rows."""
        shift = host.logits_shift
        start, end = self._bounds(*host.span(self.scope), shift)
        starts = [start] * host.batch
        if prompt:
            starts = [0] * host.batch
        elif self.scope == "block" and new_block and host.last_leftmost is not None:
            # the official step-0 window: from the leftmost row the previous step decoded (per
            # element: the official code takes the batch's minimum, which couples the prompts)
            starts = [
                s if left is None else min(s, left - shift) for s, left in zip(starts, host.last_leftmost)
            ]
        return starts, end

    def plan(self, host: HostState) -> Plan:
        if host.cold:
            self.reset()
        self._mask_id, self._shift = host.mask_token_id, host.logits_shift
        self._eos = tuple(host.eos_token_ids) if self.delay_eos else ()
        new_block = host.block_start != self._block_start
        self._block_start = host.block_start
        self._in_block = 0 if new_block else self._in_block + 1
        if host.block_start is not None and host.response_start is not None:
            step = host.block_start - host.response_start + self._in_block  # the official step_cnt
        else:
            step = self._steps
        self._steps += 1
        if host.cold or step == 0:
            return FULL
        prompt = step % self.prompt_update_freq == 0
        starts, end = self._window(host, new_block, prompt)
        lengths = [end - s for s in starts]
        window = max(lengths)
        width = bucket_size(window, host.seq_len)
        span = dict(
            span_start=torch.tensor(starts, device=host.device),
            span_len=torch.tensor(lengths, device=host.device),
        )
        if prompt or step % self.block_update_freq == 0:  # the window without skipping
            return Plan(RefreshKey(width), **span, note={"active": window})
        block = (host.block_end - host.block_start) if host.block_start is not None else window
        floor = min(host.last_committed + 2, block)
        selections = kept_counts(tuple(self.layout(host.n_layers)), window, floor)
        return Plan(SkipKey(width, selections), **span, note={"window": window})

    def plan_keys(self, layout, seq_len, n_layers, shift) -> set[PlanKey]:
        block = layout.block
        floors = sorted({min(c + 2, block) for c in range(layout.commits(bool(shift)) + 1)})
        layers = tuple(self.layout(n_layers))
        keys: set[PlanKey] = {FullKey()}
        for k in range(layout.num_blocks):
            # the official step counter (block offset + step in block) decides refreshes; only
            # the step classes matter, not which step
            classes = set()
            for j in range(layout.in_block_steps()):
                step = k * block + j
                if step == 0:
                    continue
                prompt = step % self.prompt_update_freq == 0
                classes.add((j == 0, prompt, prompt or step % self.block_update_freq == 0))
            for new_block, prompt, refresh in classes:
                for window in self._windows(layout, seq_len, shift, k, new_block, prompt):
                    width = bucket_size(window, seq_len)
                    if refresh:
                        keys.add(RefreshKey(width))
                    else:
                        keys.update(SkipKey(width, kept_counts(layers, window, f)) for f in floors)
        return keys

    def _windows(self, layout, seq_len: int, shift: int, k: int, new_block: bool, prompt: bool) -> set[int]:
        """:meth:`_window`'s possible window lengths (the longest of the batch) at block ``k``."""
        block_start = layout.block_bounds(seq_len, k)[0]
        start, end = self._bounds(*self.layout_span(layout, seq_len, k), shift)
        if prompt:
            return {end}
        if self.scope == "block" and new_block and k > 0:
            # from the leftmost row the previous step decoded: a row of the previous block
            return {
                end - min(start, left - shift) for left in range(block_start - layout.block, block_start + 1)
            }
        return {end - start}

    def observe(self, plan, counts, n_layers, seq_len) -> StepReport:
        if plan.kind == "full":
            return StepReport([seq_len] * n_layers)
        if plan.kind == "refresh":
            return StepReport([plan.note["active"]] * n_layers)
        active, current, selections = [], plan.note["window"], dict(plan.key.selections)
        after = self.variation == "hidden"  # hidden: the skip layer itself still runs every row
        for layer in range(n_layers):
            if layer in selections and not after:
                current = selections[layer]
            active.append(current)
            if layer in selections and after:
                current = selections[layer]
        return StepReport(active, capacity=min(selections.values(), default=0))

    # --- device: the step ----------------------------------------------------------------------

    def recorder(self, buffers: ESDLLMBuffers, pieces=None):
        if not buffers.snapshot:
            return None

        def record(r):
            if r.layer not in buffers.snapshot:
                return
            if self.variation == "hidden":
                write_rows(buffers.snapshot[r.layer], r.rows, r.out, 1)
            else:  # query: recomputed from the layer's input
                write_rows(
                    buffers.snapshot[r.layer], r.rows, pieces.query(r.layer, r.x, r.rows, r.prologue)[0], 2
                )

        return record

    def step(self, pieces, plan, inp, cache, buffers: ESDLLMBuffers) -> StepOutput:
        masked = self._masked_rows(inp.input_ids)
        buffers.confidence.mul_(masked)  # decoded rows have no confidence any more
        if plan.kind == "skip":
            out = self._skip_step(pieces, plan, inp, cache, buffers, masked)
        elif plan.kind == "refresh":
            out = rows_step(pieces, inp, cache, plan_span_rows(plan, inp), self.recorder(buffers, pieces))
        else:
            # the generation's first step (or a re-layout): its masked rows are the response
            buffers.response.copy_(inp.input_ids == self._mask_id)
            out = full_step(pieces, inp, cache, self.recorder(buffers, pieces))
        delayed = self._delayed_eos(inp, out, buffers, masked, pieces.vocab_shard)
        self._update_confidence(buffers, inp, out, masked, delayed, pieces.vocab_shard)
        buffers.prev_ids.copy_(inp.input_ids)
        if delayed is None:
            return out
        eligible = torch.ones_like(delayed) if out.eligible is None else out.eligible
        return StepOutput(out.logits, eligible=eligible & ~delayed, counts=out.counts)

    def _masked_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) float: 1 where the token a row predicts (its own, or the next one for Dream) is
        still masked."""
        masked = ids == self._mask_id
        if self._shift:
            masked = torch.cat([masked[:, self._shift :], torch.zeros_like(masked[:, : self._shift])], 1)
        return masked.float()

    @staticmethod
    def _block(inp) -> tuple[torch.Tensor, torch.Tensor]:
        """(the block's logit rows (B, Lb), their slots in the step's logit positions)."""
        if inp.block_rows is None:
            slots = torch.arange(inp.logit_positions.shape[1], device=inp.logit_positions.device)
            return inp.logit_positions, slots.expand_as(inp.logit_positions)
        # the logit positions are the block's rows, or (forward()) every row: then row = slot
        same = inp.block_rows.shape == inp.logit_positions.shape
        return inp.block_rows, (
            torch.arange(inp.block_rows.shape[1], device=inp.block_rows.device).expand_as(inp.block_rows)
            if same
            else inp.block_rows
        )

    def _delayed_eos(self, inp, out: StepOutput, buffers, masked, vocab=None) -> torch.Tensor | None:
        """(B, P) bool over the logit positions: the rows whose EOS the official
        ``delay_eos_generation`` holds back (``generate.py`` ``sample_tokens_LLaDA`` /
        ``sample_tokens_Dream``): a masked row that predicts EOS while the response has no EOS
        yet and the row's left neighbour is still masked. None when the rule is off. The
        prediction is the argmax (the official rule at temperature 0, as its eval runs)."""
        if not self._eos:
            return None
        rows, slots = self._block(inp)
        ids = inp.input_ids
        predicts_eos = _is_eos(vocab_argmax(take(out.logits, slots, 1), vocab), self._eos)
        left_masked = take(masked, (rows - 1).clamp_min(0), 1).bool()
        # whether each row's response holds an EOS, read as the last column of a running count:
        # inductor's CPU code generation fails (KeyError on a buffer) on an any() / amax() here
        ended = (_is_eos(ids, self._eos) & buffers.response).long().cumsum(-1)[:, -1:] > 0
        held = predicts_eos & left_masked & ~ended & take(masked, rows, 1).bool()
        return torch.zeros_like(out.logits[..., 0], dtype=torch.bool).scatter(1, slots, held)

    def _update_confidence(self, buffers, inp, out: StepOutput, masked, delayed, vocab=None) -> None:
        """The sampler's confidence (top probability) of the block's rows that produced fresh
        logits; 0 where the row's token is not masked (official: the block's rows only). A
        delayed EOS row stores 0 with LLaDA and its probability with Dream: the official LLaDA
        sampler zeroes it before ``all_confidence.scatter_``, the Dream sampler after."""
        rows, slots = self._block(inp)
        logits = take(out.logits, slots, 1)
        top = top_probability(logits, vocab) * take(masked, rows, 1)  # (B, Lb)
        if delayed is not None and not self._shift:
            top = top * ~take(delayed, slots, 1)
        eligible = None if out.eligible is None else take(out.eligible, slots, 1)
        write_rows(buffers.confidence, rows, top, 1, eligible)

    def _bonus(self, inp, buffers, masked) -> torch.Tensor:
        """(B, L): +5 on the leftmost masked row of the block, +3 on the rows decoded at the
        previous step (official ``constant_coefficient``)."""
        bonus = torch.zeros_like(masked)
        rows, _ = self._block(inp)
        block = take(masked, rows, 1)  # the block's rows
        first = rows.gather(1, block.argmax(1, keepdim=True))
        bonus.scatter_(1, first, LEFTMOST_BONUS * block.amax(1, keepdim=True))
        if self.alpha < 1.0:
            decoded = self._masked_rows(buffers.prev_ids) - masked  # masked before, not now
            bonus = bonus + LAST_DECODED_BONUS * decoded
        return bonus

    def _keep(self, new, old, rows, live, buffers, bonus, kept):
        """Slots (B, kept) of the ``kept`` most important live rows."""
        score = importance(
            take(buffers.confidence, rows, 1), variation(new, old), self.alpha, live, take(bonus, rows, 1)
        )
        return select_top(score, live, kept)[0]

    def _skip_step(self, pieces, plan, inp, cache, buffers, masked) -> StepOutput:
        selections = dict(plan.key.selections)
        rows, live = span_rows(inp.span_start, inp.span_len, plan.key.width)
        pro = pieces.prologue(inp.input_ids, inp.attention_mask, inp.position_ids, *inp.extras)
        x = take(pro.h0, rows, 1)
        bonus = self._bonus(inp, buffers, masked)
        for layer in range(pieces.n_layers):
            kept = selections.get(layer)
            if self.variation == "query" and kept is None and layer in buffers.snapshot:
                # the floor keeps every row: the official code still writes their queries
                write_rows(buffers.snapshot[layer], rows, pieces.query(layer, x, rows, pro)[0], 2)
            if kept is not None and self.variation != "hidden":
                x, rows, live = self._skip_before_attention(
                    pieces, layer, x, rows, live, pro, cache, buffers, bonus, kept
                )
                continue
            x = pieces.layer(layer, x, rows, pro, cache)[0]
            mark(cache.activity, layer, rows, 1.0, live)
            if kept is not None:
                slots = self._keep(
                    x, take(buffers.snapshot[layer], rows, 1), rows, live, buffers, bonus, kept
                )
                x, rows, live = take(x, slots, 1), take(rows, slots, 1), take(live, slots, 1)
            if self.variation == "hidden" and layer in buffers.snapshot:
                # every skip layer, also where the floor kept every row: the official
                # update_hidden_state runs at each call (models/llada_func.py)
                write_rows(buffers.snapshot[layer], rows, x, 1)
        write_rows(cache.hidden, rows, x, 1)
        positions = inp.logit_positions
        logits = head_logits(pieces, cache, positions)
        if not selections:  # no row skipped a layer (the floor kept them all)
            return StepOutput(logits)
        eligible = (positions[:, :, None] == torch.where(live, rows, -1)[:, None, :]).any(-1)
        return StepOutput(logits, eligible=eligible)

    def _skip_before_attention(self, pieces, layer, x, rows, live, pro, cache, buffers, bonus, kept):
        """A skip layer of the query / key / value variations: score on this layer's q, k or v,
        then run the layer for the kept rows only (only their K/V are written)."""
        q, mask = pieces.query(layer, x, rows, pro)
        k, v = pieces.kv(layer, x, rows, pro)
        if self.variation == "query":
            new, old = q, take(buffers.snapshot[layer], rows, 2)
        else:
            new = k if self.variation == "key" else v
            old = take(cache.k[layer] if self.variation == "key" else cache.v[layer], rows, 2)
        slots = self._keep(_features(new), _features(old), rows, live, buffers, bonus, kept)
        x, rows, live = take(x, slots, 1), take(rows, slots, 1), take(live, slots, 1)
        q, k, v = take(q, slots, 2), take(k, slots, 2), take(v, slots, 2)
        write_rows(cache.k[layer], rows, k, 2)
        write_rows(cache.v[layer], rows, v, 2)
        if self.variation == "query":
            write_rows(buffers.snapshot[layer], rows, q, 2)
        keys, values, _ = pieces.keys(layer, pro, cache)
        ctx = partial_attention(q, keys, values, rows, mask, pieces.scale(layer))
        h_mid = pieces.post(layer, x, ctx)
        mark(cache.activity, layer, rows, 1.0)
        return h_mid + pieces.mlp(layer, h_mid, rows, pro), rows, live


def _is_eos(tokens: torch.Tensor, eos: tuple[int, ...]) -> torch.Tensor:
    """Where ``tokens`` is one of the ``eos`` ids (comparisons, which every exporter lowers)."""
    hit = tokens == eos[0]
    for other in eos[1:]:
        hit = hit | (tokens == other)
    return hit


def _explicit_layout(skip_layers, keep) -> list[tuple[int, float]]:
    if skip_layers is None or keep is None:
        raise ValueError("pass skip_layers and keep together (or neither, for the official depth layout)")
    layers = tuple(int(s) for s in skip_layers)
    keep = (keep,) * len(layers) if isinstance(keep, (int, float)) else tuple(keep)
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0:
        raise ValueError(f"skip_layers must be increasing layer indices >= 0; got {layers}")
    if len(keep) != len(layers):
        raise ValueError(f"keep needs one value per skip layer ({len(layers)}); got {keep}")
    if any(isinstance(k, bool) or not isinstance(k, (int, float)) or k <= 0 for k in keep):
        raise ValueError(f"keep values must be > 0 (a fraction of the window, or a row count); got {keep}")
    return list(zip(layers, keep))


__all__ = [
    "ESDLLMBuffers",
    "ESDLLMPolicy",
    "SkipKey",
    "importance",
    "kept_counts",
    "skip_layout",
    "variation",
]
