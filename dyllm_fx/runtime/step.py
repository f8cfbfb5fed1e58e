"""The contract between the denoising loop and whatever computes logits.

The loop never calls a model directly: it hands a :class:`StepRequest` to a step function and
gets back the logits of the current block, as a tensor or a :class:`StepOutput` (which may also
say which positions' logits are fresh enough to commit). :class:`DenseStep` runs the
untransformed model (a full forward every step); :class:`SparseStep` runs a transformed model's
:class:`~dyllm_fx.runtime.engine.StepEngine`, with caches, behind the same contract, so samplers
and schedules are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from dyllm_fx.models.spec import DiffusionSpec

from .policies import StepOutput


@dataclass(frozen=True)
class StepRequest:
    input_ids: torch.Tensor  # (B, L) current tokens, masks included
    attention_mask: torch.Tensor | None  # (B, L) 1 for real tokens, 0 for left padding
    position_ids: torch.Tensor  # (B, L) positions that skip the padding
    block: int  # index of the block being decoded
    block_start: int  # absolute [start, end) of that block
    block_end: int
    step_in_block: int
    nfe: int  # forward evaluations so far in this generation
    last_committed: int = 0  # tokens the previous step committed, most of any batch element
    # per batch element, the smallest position the previous step committed (None: nothing)
    last_leftmost: tuple[int | None, ...] | None = None
    response_start: int | None = None  # first response column (None: the first block's start)
    # the rows moved to new columns since the last step (serving, at a block boundary): the step
    # is cold, but the generation goes on (see ``HostState.relayout``)
    relayout: bool = False


class StepFunction(Protocol):
    def __call__(self, request: StepRequest) -> torch.Tensor | StepOutput:
        """Logits (B, block_end - block_start, V) for the positions of the current block."""
        ...


def as_step_output(result: torch.Tensor | StepOutput) -> StepOutput:
    return result if isinstance(result, StepOutput) else StepOutput(result)


def block_logit_positions(request: StepRequest, shift: int) -> torch.Tensor:
    """(B, block length) rows whose logits predict the block's tokens (shifted for Dream)."""
    ids = request.input_ids
    positions = torch.arange(request.block_start - shift, request.block_end - shift, device=ids.device)
    return positions.expand(ids.shape[0], -1)


class DenseStep:
    """Full forward of ``model`` every step; applies the model's logit shift (Dream). A model
    whose logits carry a ``commit_mask`` (a transformed model's ``forward()``, also through
    ``torch.compile(backend="dyllm")``) limits what the loop may commit."""

    def __init__(self, model: nn.Module, spec: DiffusionSpec):
        self.model = model
        self.spec = spec

    def __call__(self, request: StepRequest) -> torch.Tensor | StepOutput:
        out = self.model(
            request.input_ids, attention_mask=request.attention_mask, position_ids=request.position_ids
        )
        logits = getattr(out, "logits", out)
        # With shift 1 the logit for position i is read at i - 1 (the prompt is never empty).
        shift = self.spec.logits_shift
        block = slice(request.block_start - shift, request.block_end - shift)
        commit_mask = getattr(logits, "commit_mask", None)
        if commit_mask is None:
            return logits[:, block]
        return StepOutput(logits[:, block], eligible=commit_mask[:, block])


class SparseStep:
    """A transformed model's engine as a step function: the LM head runs for the block only.
    The one place a :class:`StepRequest` becomes the engine's host information."""

    def __init__(self, engine, spec: DiffusionSpec):
        self.engine = engine
        self.spec = spec
        self.response_start: int | None = None

    def __call__(self, request: StepRequest) -> StepOutput:
        if request.nfe == 0:
            self.engine.reset()  # a new generation: nothing cached is valid
            self.response_start = request.block_start  # the first block starts at the prompt's end
        shift = self.spec.logits_shift
        response_start = self.response_start if request.response_start is None else request.response_start
        return self.engine.step(
            request.input_ids,
            request.attention_mask,
            request.position_ids,
            block_logit_positions(request, shift),
            step=request.nfe,
            block_start=request.block_start,
            block_end=request.block_end,
            response_start=response_start,
            mask_token_id=self.spec.mask_token_id,
            eos_token_ids=tuple(self.spec.eos_token_ids),
            logits_shift=shift,
            last_committed=request.last_committed,
            last_leftmost=request.last_leftmost,
            relayout=request.relayout,
        )


__all__ = [
    "DenseStep",
    "SparseStep",
    "StepFunction",
    "StepRequest",
    "as_step_output",
    "block_logit_positions",
]
