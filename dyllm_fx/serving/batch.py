"""One running batch: rows at different block offsets, laid out so their current blocks share
columns, stepped by the model's step engine one denoising step at a time.

**The layout.** Each row keeps its own token sequence (prompt + response window) on the host
side. At a block boundary where rows joined or left, the batch tensor is rebuilt so that every
row's *current block* lands in the same columns ``[C, C + block_length)``: row ``i`` gets
``C - (prompt_i + decoded_i)`` left pads, and rows with fewer blocks left get right pads (both
with attention mask 0 and positions that skip them, so each row sees its own sequence exactly).
The engine then still sees one common block per step. Between re-layouts the rows advance
together, one block at a time, and the tensor stays as it is.

**A re-layout is a cold step** (every row, every layer): the columns moved, so nothing cached
is valid. The step engine is told ``relayout=True``: policies keep their schedule counters
(DyLLM does not repeat its dense warm-up steps) instead of starting a new generation. Block
caches (prefix / dual) refresh at every block start anyway, so they lose nothing.

**Sampling is per row**, with the row's own sampler (temperature, remasking / alg, threshold,
top-p / top-k), its own random stream when it has a seed, and the block position and sequence
length the row has when decoded alone. So with an exact policy (vanilla, or the block caches)
a row commits the same tokens in any batch as ``generate()`` of its prompt alone.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from ..models.layers import default_position_ids
from ..models.spec import DiffusionSpec
from ..runtime.engine import StepEngine
from ..runtime.samplers import StepContext
from ..runtime.step import DenseStep, StepRequest, as_step_output
from .sequence import Sequence


class Stepper:
    """The step function of one batch, with caches of its own.

    * a transformed model: a new :class:`StepEngine` over the model's traced program (shared
      weights and pieces) with a copy of its policy, so batches side by side never touch each
      other's caches;
    * another model with ``make_step_function`` (an ONNX step graph): its one step function
      (``shared``: only one batch may run at a time), restarted at every re-layout;
    * a plain model: a full forward per step (:class:`DenseStep`).
    """

    def __init__(self, model, spec: DiffusionSpec):
        self.spec = spec
        self.engine: StepEngine | None = None
        self.fn = None
        engine = getattr(model, "engine", None)
        if isinstance(engine, StepEngine) and hasattr(model, "program"):
            backend = engine.compiler.backend if engine.compile else False
            self.engine = StepEngine(
                model.program, copy.deepcopy(engine.policy), compile=backend, cuda_graphs=engine.cuda_graphs
            )
        elif callable(getattr(model, "make_step_function", None)):
            self.fn = model.make_step_function()
        else:
            self.fn = DenseStep(model, spec)
        self.shared = self.engine is None and not isinstance(self.fn, DenseStep)

    @property
    def policy_name(self) -> str:
        return self.engine.policy.name if self.engine is not None else "vanilla"

    def new_generation(self) -> None:
        if self.engine is not None:
            self.engine.reset()

    def __call__(
        self,
        x,
        attn,
        pos,
        start: int,
        end: int,
        response_start: int,
        nfe: int,
        step_in_block: int,
        block: int,
        last: tuple,
        relayout: bool,
    ):
        """(StepOutput, the step's active fraction)."""
        if self.engine is not None:
            shift = self.spec.logits_shift
            positions = torch.arange(start - shift, end - shift, device=x.device).expand(x.shape[0], -1)
            out = self.engine.step(
                x,
                attn,
                pos,
                positions,
                step=nfe,
                block_start=start,
                block_end=end,
                response_start=response_start,
                mask_token_id=self.spec.mask_token_id,
                logits_shift=shift,
                last_committed=last[0],
                last_leftmost=last[1],
                relayout=relayout,
            )
            record = self.engine.records[-1]
            self.engine.records.clear()  # a server runs for ever: keep no per-step history
            return out, record.active_fraction
        # a step function restarts its generation at nfe == 0 (SparseStep resets its engine)
        request = StepRequest(x, attn, pos, block, start, end, step_in_block, 0 if relayout else nfe, *last)
        return as_step_output(self.fn(request)), 1.0


class Batch:
    """Rows sharing one block clock (``key`` = (block_length, steps per block or None))."""

    def __init__(self, key: tuple, stepper: Stepper, spec: DiffusionSpec, tokenizer, device: torch.device):
        self.key = key
        self.block_length, self.steps_per_block = key
        self.stepper = stepper
        self.spec = spec
        self.tokenizer = tokenizer
        self.device = device
        self.pad_id = spec.pad_token_id if spec.pad_token_id is not None else (spec.eos_token_ids or (0,))[0]
        self.rows: list[Sequence] = []
        self.x: torch.Tensor | None = None
        self.attn: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.response_cols: list[int] = []
        self.col = 0  # the current block's first column
        self.in_block = False
        self.needs_layout = True
        self.fresh = True  # the engine has not run this batch yet: a new generation
        self.relayout_now = False  # the next step follows a re-layout (a cold step, same generation)
        self.step_in_block = 0
        self.restricted = False
        self.initial: torch.Tensor | None = None
        self.nfe = 0
        self.relayouts = 0
        self.last: tuple = (0, None)
        self.last_active = 0.0  # the last step's active fraction

    def __len__(self) -> int:
        return len(self.rows)

    # --- block boundaries ------------------------------------------------------------------

    def drop_finished(self) -> list[Sequence]:
        """Remove finished and cancelled rows (only at a block boundary)."""
        gone = [s for s in self.rows if s.finished or s.cancelled]
        if gone:
            self.rows = [s for s in self.rows if not (s.finished or s.cancelled)]
            self.needs_layout = True
        return gone

    def add(self, seqs: list[Sequence]) -> None:
        if seqs:
            self.rows.extend(seqs)
            self.needs_layout = True

    def begin_block(self) -> None:
        """Start the next block of every row: re-lay the rows out if the set changed, else move
        the block window one block to the right."""
        if self.needs_layout:
            self._layout()
        else:
            self.col += self.block_length
        b = self.block_length
        self.initial = (self.x[:, self.col : self.col + b] == self.spec.mask_token_id).sum(-1)
        self.step_in_block = 0
        self.restricted = False
        self.in_block = True

    def _layout(self) -> None:
        pre = [s.pre_block for s in self.rows]
        col = max(pre)
        length = col + max(s.remaining for s in self.rows)
        x = torch.full((len(self.rows), length), self.pad_id, dtype=torch.long, device=self.device)
        attn = torch.zeros_like(x)
        self.response_cols = []
        for i, s in enumerate(self.rows):
            left, plen = col - pre[i], len(s.prompt_ids)
            x[i, left : left + plen] = s.request.prompt_tensor
            x[i, left + plen : left + plen + s.resolved.window] = s.response
            attn[i, left : left + plen + s.resolved.window] = 1
            self.response_cols.append(left + plen)
        self.x, self.col = x, col
        self.attn = None if bool(attn.all()) else attn  # no padding: let the model skip the mask
        self.pos = default_position_ids(x, self.attn)
        self.relayout_now = not self.fresh
        if self.relayout_now:
            self.relayouts += 1
            for s in self.rows:
                s.relayouts += 1
        self.needs_layout = False
        self.last = (0, None)

    # --- one step --------------------------------------------------------------------------

    def step(self, now=time.monotonic) -> list[Sequence]:
        """One denoising step of every row; returns the rows whose block ended (all rows, at
        the block's last step; their text is updated), else []."""
        if self.fresh:
            self.stepper.new_generation()
        relayout, self.relayout_now = self.relayout_now, False
        b, spb = self.block_length, self.steps_per_block
        start, end = self.col, self.col + b
        block = max(s.blocks_done for s in self.rows)
        out, active = self.stepper(
            self.x,
            self.attn,
            self.pos,
            start,
            end,
            min(self.response_cols),
            self.nfe,
            self.step_in_block,
            block,
            self.last,
            relayout,
        )
        self.fresh = False
        mask_id = self.spec.mask_token_id
        window = self.x[:, start:end]
        masked = window == mask_id
        allowed = masked if out.eligible is None else masked & out.eligible
        self.restricted |= out.eligible is not None
        step = self.step_in_block
        extra = spb is not None and step >= spb
        ctx_step = step if spb is None else min(step, spb - 1)
        transfer = torch.zeros_like(masked)
        for i, s in enumerate(self.rows):
            if s.cancelled:
                continue
            ctx = StepContext(ctx_step, spb, self.initial[i : i + 1], s.own_block_start(), s.own_seq_len())
            with s.rng.active() if s.rng is not None else contextlib.nullcontext():
                chosen = s.sampler.select(out.logits[i : i + 1], allowed[i : i + 1], ctx)
            t = chosen.transfer & allowed[i : i + 1]
            if extra and not bool(t.any()):  # past the schedule: commit the best allowed token
                t = _best_allowed(chosen.confidence, allowed[i : i + 1])
            window[i] = torch.where(t[0], chosen.tokens[0], window[i])
            transfer[i] = t[0]
            s.nfe += 1
            s.active_sum += active
        self.nfe += 1
        self.last_active = active
        self.step_in_block += 1
        self.last = _commit_summary(transfer, start)
        if self._block_continues(masked_now=self._live_masks(start, end)):
            return []
        self.in_block = False
        return self._end_block(now())

    def _live_masks(self, start: int, end: int) -> bool:
        live = torch.tensor([not s.cancelled for s in self.rows], device=self.device)
        return bool(((self.x[:, start:end] == self.spec.mask_token_id) & live[:, None]).any())

    def _block_continues(self, masked_now: bool) -> bool:
        """As the denoising loop: threshold decoding runs until the block is decoded (at most
        twice its length in steps); a fixed schedule runs its steps, and more (up to another
        block length) only while a step function that withholds positions left masks."""
        if not any(not s.cancelled for s in self.rows):
            return False
        step, b, spb = self.step_in_block, self.block_length, self.steps_per_block
        if spb is None:
            return step < 2 * b and masked_now
        if step < spb:
            return True
        return self.restricted and step < spb + b and masked_now

    def _end_block(self, now: float) -> list[Sequence]:
        ended = []
        rows = self.x.tolist()
        for i, s in enumerate(self.rows):
            if s.cancelled:
                continue
            col = self.response_cols[i]
            response = rows[i][col : col + s.resolved.window]
            s.response = self.x[i, col : col + s.resolved.window].clone()
            s.block_done(response, self.tokenizer, self.spec, now)
            if s.blocks_done >= s.resolved.num_blocks and not s.finished:
                s.finish("length")
            ended.append(s)
        return ended


def _best_allowed(confidence: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The most confident allowed position of every row that has one."""
    score = torch.where(allowed, confidence.float(), float("-inf"))
    best = torch.zeros_like(allowed).scatter_(1, score.argmax(-1, keepdim=True), True)
    return best & allowed


def _commit_summary(transfer: torch.Tensor, start: int) -> tuple[int, tuple[int | None, ...]]:
    """(most tokens any row committed, per row the leftmost committed column or None)."""
    width = transfer.shape[1]
    cols = torch.arange(width, device=transfer.device)
    left = torch.where(transfer, cols, width).amin(-1)
    most, *leftmost = torch.cat([transfer.sum(-1).amax()[None], left]).tolist()
    return most, tuple(start + c if c < width else None for c in leftmost)


__all__ = ["Batch", "Stepper"]
