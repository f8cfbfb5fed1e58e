"""The state a denoising loop advances, one step at a time, and the rule that commits tokens.

Both callers of the LLaDA / Dream spine step one :class:`BlockDecoder`: ``runtime.loop.denoise``
(one generation, blocks left to right) and the serving scheduler's ``Batch`` (rows at different
block offsets, laid out anew at block boundaries). A step is: a :class:`StepRequest` from the
state -> the step function -> the positions that may be committed -> a ``select`` (the sampler
over the whole batch, :func:`sampler_select`, or serving's row by row) -> the commit rule
(:func:`commit_rule`) -> the commit summary the next request carries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dyllm_fx.models.layers import default_position_ids
from dyllm_fx.vocab_parallel import VocabShard

from .policies import StepOutput
from .samplers import Selection, StepContext
from .step import StepFunction, StepRequest, as_step_output

# (decoder, block logits, allowed positions) -> (positions to commit, their tokens), both (B, Lb)
Select = Callable[["BlockDecoder", torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class StepCommit:
    """What one step of a :class:`BlockDecoder` did."""

    output: StepOutput  # the step function's output (logits, eligible positions, report)
    committed: int  # tokens committed, summed over the batch
    past_schedule: bool  # the step ran after the block's scheduled steps


class BlockDecoder:
    """Tokens (B, L) with their attention mask and positions, the block clock (block index,
    first column, step in block, initial masks, whether the step function withheld positions)
    and what the last step committed. ``steps_per_block`` None: threshold decoding."""

    def __init__(self, mask_token_id: int, block_length: int, steps_per_block: int | None):
        self.mask_token_id = mask_token_id
        self.block_length = block_length
        self.steps_per_block = steps_per_block
        self.x: torch.Tensor | None = None
        self.attn: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.response_start: int | None = None
        self.relayout = False  # the next step follows a re-layout: cold, same generation
        self.nfe = 0  # forward evaluations so far in this generation
        # (most tokens any row committed, each row's leftmost committed position) at the last step
        self.last: tuple[int, tuple[int | None, ...] | None] = (0, None)
        self.block = 0
        self.start = 0
        self.step_in_block = 0
        self.restricted = False
        self.initial: torch.Tensor | None = None

    def lay_out(self, x: torch.Tensor, attn: torch.Tensor | None, response_start: int | None) -> None:
        """Take the tokens ``x`` (B, L) and their attention mask (None: no padding). Once a step
        has run, this is a re-layout: the next step is cold but the generation goes on."""
        self.x, self.attn = x, attn
        self.pos = default_position_ids(x, attn)
        self.response_start = response_start
        self.relayout = self.nfe > 0
        self.last = (0, None)

    @property
    def end(self) -> int:
        return self.start + self.block_length

    @property
    def window(self) -> torch.Tensor:
        """The current block's columns of ``x`` (a view)."""
        return self.x[:, self.start : self.end]

    @property
    def past_schedule(self) -> bool:
        """The block's scheduled steps are done (only a step function that withholds positions
        keeps a fixed-schedule block going)."""
        return self.steps_per_block is not None and self.step_in_block >= self.steps_per_block

    @property
    def schedule_step(self) -> int:
        """The step index the sampler's schedule sees: steps past the schedule count as its last."""
        spb = self.steps_per_block
        return self.step_in_block if spb is None else min(self.step_in_block, spb - 1)

    def begin_block(self, block: int, start: int) -> None:
        """Start decoding block ``block``, whose first column is ``start``."""
        self.block, self.start = block, start
        self.initial = (self.window == self.mask_token_id).sum(-1)
        self.step_in_block = 0
        self.restricted = False

    def request(self) -> StepRequest:
        return StepRequest(
            self.x,
            self.attn,
            self.pos,
            self.block,
            self.start,
            self.end,
            self.step_in_block,
            self.nfe,
            *self.last,
            response_start=self.response_start,
            relayout=self.relayout,
        )

    def step(self, step_fn: StepFunction, select: Select, evaluations: int = 1) -> StepCommit:
        """One denoising step; ``evaluations``: forward passes the step function makes (2 under
        classifier-free guidance)."""
        out = as_step_output(step_fn(self.request()))
        self.relayout = False
        masked = self.window == self.mask_token_id
        # ES-dLLM: only rows that ran every layer may be committed
        allowed = masked if out.eligible is None else masked & out.eligible
        self.restricted |= out.eligible is not None
        past = self.past_schedule
        transfer, tokens = select(self, out.logits, allowed)
        self.x[:, self.start : self.end] = torch.where(transfer, tokens, self.window)
        most, leftmost, total = commit_summary(transfer, self.start)
        self.last = (most, leftmost)
        self.nfe += evaluations
        self.step_in_block += 1
        return StepCommit(out, total, past)

    def block_continues(self, live: torch.Tensor | None = None) -> bool:
        """Threshold decoding runs until the block is decoded (each step commits at least one
        token, so a block length of steps suffices; the cap of twice that stops a model that keeps
        predicting the mask token itself). A fixed schedule runs its steps; a step function that
        withheld positions (ES-dLLM: rows that skipped layers) may have left masks the schedule
        meant to commit, so then the block continues while masks are left, for at most another
        block length of steps. ``live`` (B,) bool: only these rows count (none: the block ends)."""
        masks = self.window == self.mask_token_id
        if live is not None:
            if not bool(live.any()):
                return False
            masks = masks & live[:, None]
        step, b, spb = self.step_in_block, self.block_length, self.steps_per_block
        if spb is None:
            return step < 2 * b and bool(masks.any())
        if step < spb:
            return True
        return self.restricted and step < spb + b and bool(masks.any())


def sampler_select(sampler, vocab: VocabShard | None = None) -> Select:
    """``sampler`` choosing for the whole batch at once, then the commit rule. ``vocab``: the
    logits are this slice of the vocabulary (a tensor-parallel head, the spec's ``vocab_shard``)."""

    def select(decoder: BlockDecoder, logits: torch.Tensor, allowed: torch.Tensor):
        ctx = StepContext(
            decoder.schedule_step,
            decoder.steps_per_block,
            decoder.initial,
            decoder.start,
            decoder.x.shape[1],
            vocab,
        )
        chosen = sampler.select(logits, allowed, ctx)
        return commit_rule(chosen, allowed, decoder.past_schedule), chosen.tokens

    return select


def commit_rule(chosen: Selection, allowed: torch.Tensor, past_schedule: bool) -> torch.Tensor:
    """The positions to commit: the selected ones that are allowed; past the block's schedule,
    when that is none at all, the most confident allowed position of every row that has one."""
    transfer = chosen.transfer & allowed
    if past_schedule and not bool(transfer.any()):
        transfer = best_allowed(chosen.confidence, allowed)
    return transfer


def best_allowed(confidence: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The most confident allowed position of every row that has one."""
    score = torch.where(allowed, confidence.float(), float("-inf"))
    best = torch.zeros_like(allowed).scatter_(1, score.argmax(-1, keepdim=True), True)
    return best & allowed


def commit_summary(transfer: torch.Tensor, start: int) -> tuple[int, tuple[int | None, ...], int]:
    """(most tokens any row committed, per row the leftmost committed position or None, total
    committed), read from the device in one transfer."""
    per_row = transfer.sum(-1)
    width = transfer.shape[1]
    cols = torch.arange(width, device=transfer.device)
    left = torch.where(transfer, cols, width).amin(-1)
    most, total, *leftmost = torch.cat([torch.stack([per_row.amax(), per_row.sum()]), left]).tolist()
    return most, tuple(start + c if c < width else None for c in leftmost), total


__all__ = [
    "BlockDecoder",
    "Select",
    "StepCommit",
    "best_allowed",
    "commit_rule",
    "commit_summary",
    "sampler_select",
]
