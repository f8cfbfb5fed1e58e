"""The contract between the denoising loop and whatever computes logits.

The loop never calls a model directly: it hands a :class:`StepRequest` to a step function and
gets back the logits of the current block. :class:`DenseStep` runs the untransformed model
(a full forward every step); the compiler's transformed model provides its own step function
with caches behind the same contract, so samplers and schedules are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from dyllm_fx.models.spec import DiffusionSpec


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


class StepFunction(Protocol):
    def __call__(self, request: StepRequest) -> torch.Tensor:
        """Logits (B, block_end - block_start, V) for the positions of the current block."""
        ...


class DenseStep:
    """Full forward of ``model`` every step; applies the model's logit shift (Dream)."""

    def __init__(self, model: nn.Module, spec: DiffusionSpec):
        self.model = model
        self.spec = spec

    def __call__(self, request: StepRequest) -> torch.Tensor:
        out = self.model(request.input_ids, attention_mask=request.attention_mask, position_ids=request.position_ids)
        logits = getattr(out, "logits", out)
        # With shift 1 the logit for position i is read at i - 1 (the prompt is never empty).
        shift = self.spec.logits_shift
        return logits[:, request.block_start - shift : request.block_end - shift]
