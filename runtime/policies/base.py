"""The policy contract: which rows each layer recomputes at a step.

The sparse step asks the policy at three hook points:

* ``rows(layer, state)`` before a layer: the active rows, (B, A) int64, or None for all;
* ``after_attention(layer, rows, context)`` with the attention context of the active rows
  (B, H, A, d): may return a subset (B, A') of positions *into* ``rows`` that get the MLP,
  the others keep their cached MLP output (None: all of them);
* ``after_block(layer, rows, hidden)`` with the layer's new output for the active rows.

A step with a cold cache always runs every row, whatever the policy says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepState:
    """What a policy may look at when it decides."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor | None
    step: int  # forward evaluations so far in this generation
    block_start: int | None  # current block bounds, when the caller is the denoising loop
    block_end: int | None
    cold: bool  # the cache is empty: every row runs


class Policy:
    name = "base"
    needs_mlp_cache = False  # set by policies whose after_attention returns subsets

    def begin_step(self, state: StepState) -> None:
        self.state = state

    def rows(self, layer: int, state: StepState) -> torch.Tensor | None:
        return None

    def after_attention(self, layer: int, rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_block(self, layer: int, rows: torch.Tensor, hidden: torch.Tensor) -> None:
        return None

    def layer_similarity(self, layer: int) -> torch.Tensor | None:
        """(B, L) fp32 cosine similarity of each position's attention context to the previous
        step's, as measured at this step's ``layer`` (NaN where not measured), or None when
        this policy measures none. Read by the engine when ``record_similarity`` is on."""
        return None
