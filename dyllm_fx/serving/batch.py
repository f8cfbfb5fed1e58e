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
import dataclasses
import time

import torch

from ..models.spec import DiffusionSpec
from ..runtime.block_decoder import BlockDecoder, commit_rule
from ..runtime.engine import StepEngine
from ..runtime.policies import StepOutput
from ..runtime.samplers import StepContext
from ..runtime.step import DenseStep, SparseStep, StepRequest
from .sequence import Sequence


class Stepper:
    """The step function of one batch, with caches of its own.

    * a transformed model: a new :class:`StepEngine` over the model's traced program (shared
      weights and pieces) with a copy of its policy, so batches side by side never touch each
      other's caches, run by the runtime's :class:`SparseStep` (re-layouts reach the policy);
    * another model with ``make_step_function`` (an ONNX step graph): its one step function
      (``shared``: only one batch may run at a time), restarted at every re-layout;
    * a plain model: a full forward per step (:class:`DenseStep`).
    """

    def __init__(self, model, spec: DiffusionSpec):
        self.engine: StepEngine | None = None
        engine = getattr(model, "engine", None)
        if isinstance(engine, StepEngine) and hasattr(model, "program"):
            backend = engine.compiler.backend if engine.compile else False
            self.engine = StepEngine(
                model.program, copy.deepcopy(engine.policy), compile=backend, cuda_graphs=engine.cuda_graphs
            )
            self.fn = SparseStep(self.engine, spec)
        elif callable(getattr(model, "make_step_function", None)):
            self.fn = model.make_step_function()
        else:
            self.fn = DenseStep(model, spec)
        self.shared = self.engine is None and not isinstance(self.fn, DenseStep)
        self.last_active = 1.0  # the last step's active fraction

    @property
    def policy_name(self) -> str:
        return self.engine.policy.name if self.engine is not None else "vanilla"

    def __call__(self, request: StepRequest) -> torch.Tensor | StepOutput:
        """One step of the batch (a new generation at ``request.nfe == 0``)."""
        if self.engine is None:
            # a step function of its own restarts its generation (nfe 0) instead of a re-layout
            request = dataclasses.replace(
                request, nfe=0 if request.relayout else request.nfe, response_start=None, relayout=False
            )
            self.last_active = 1.0
            return self.fn(request)
        out = self.fn(request)
        self.last_active = self.engine.records[-1].active_fraction
        self.engine.records.clear()  # a server runs for ever: keep no per-step history
        return out


class Batch:
    """Rows sharing one block clock (``key`` = (block_length, steps per block or None)), stepped
    through the runtime's :class:`BlockDecoder` with each row's own sampler."""

    def __init__(self, key: tuple, stepper: Stepper, spec: DiffusionSpec, tokenizer, device: torch.device):
        self.key = key
        self.block_length, self.steps_per_block = key
        self.stepper = stepper
        self.spec = spec
        self.tokenizer = tokenizer
        self.device = device
        self.pad_id = spec.pad_token_id if spec.pad_token_id is not None else (spec.eos_token_ids or (0,))[0]
        self.rows: list[Sequence] = []
        self.decoder = BlockDecoder(spec.mask_token_id, self.block_length, self.steps_per_block)
        self.response_cols: list[int] = []
        self.in_block = False
        self.needs_layout = True
        self.relayouts = 0
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
        start = self._layout() if self.needs_layout else self.decoder.end
        self.decoder.begin_block(max(s.blocks_done for s in self.rows), start)
        self.in_block = True

    def _layout(self) -> int:
        """Lay the rows out so their current blocks share columns; returns the block's first one."""
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
        # no padding: let the model skip the mask
        self.decoder.lay_out(x, None if bool(attn.all()) else attn, min(self.response_cols))
        if self.decoder.relayout:
            self.relayouts += 1
            for s in self.rows:
                s.relayouts += 1
        self.needs_layout = False
        return col

    # --- one step --------------------------------------------------------------------------

    def step(self, now=time.monotonic) -> list[Sequence]:
        """One denoising step of every row; returns the rows whose block ended (all rows, at
        the block's last step; their text is updated), else []."""
        self.decoder.step(self.stepper, self._select_rows)
        active = self.stepper.last_active
        live = [not s.cancelled for s in self.rows]
        for s in self.rows:
            if not s.cancelled:
                s.nfe += 1
                s.active_sum += active
        self.last_active = active
        if self.decoder.block_continues(torch.tensor(live, device=self.device)):
            return []
        self.in_block = False
        return self._end_block(now())

    def _select_rows(self, decoder: BlockDecoder, logits: torch.Tensor, allowed: torch.Tensor):
        """Each live row chosen by its own sampler and random stream, at the block position and
        sequence length it has when decoded alone, then the commit rule row by row."""
        transfer = torch.zeros_like(allowed)
        tokens = decoder.window.clone()
        for i, s in enumerate(self.rows):
            if s.cancelled:
                continue
            ctx = StepContext(
                decoder.schedule_step,
                decoder.steps_per_block,
                decoder.initial[i : i + 1],
                s.own_block_start(),
                s.own_seq_len(),
                self.spec.vocab_shard,
            )
            with s.rng.active() if s.rng is not None else contextlib.nullcontext():
                chosen = s.sampler.select(logits[i : i + 1], allowed[i : i + 1], ctx)
            transfer[i] = commit_rule(chosen, allowed[i : i + 1], decoder.past_schedule)[0]
            tokens[i] = chosen.tokens[0]
        return transfer, tokens

    def _end_block(self, now: float) -> list[Sequence]:
        ended = []
        x = self.decoder.x
        rows = x.tolist()
        for i, s in enumerate(self.rows):
            if s.cancelled:
                continue
            col = self.response_cols[i]
            response = rows[i][col : col + s.resolved.window]
            s.response = x[i, col : col + s.resolved.window].clone()
            s.block_done(response, self.tokenizer, self.spec, now)
            if s.blocks_done >= s.resolved.num_blocks and not s.finished:
                s.finish("length")
            ended.append(s)
        return ended


__all__ = ["Batch", "Stepper"]
