"""Fast-dLLM's block caches (prefix cache and dual cache).

Decoding is semi-autoregressive, so tokens outside the current block change little while the
block is decoded. At the first step of each block every row is recomputed (the refresh); on
the block's later steps:

* ``prefix_cache`` recomputes the current block and everything after it, and reuses the
  K/V and hidden states of the prefix (prompt and earlier blocks);
* ``dual_cache`` recomputes the current block only, and reuses both the prefix and the
  suffix.
"""

from __future__ import annotations

import torch

from .base import Policy, StepState


class _BlockCachePolicy(Policy):
    layer_uniform = True
    def __init__(self):
        self._block_start: int | None = None
        self.refresh = True

    def begin_step(self, state: StepState) -> None:
        super().begin_step(state)
        if state.block_start is None:
            raise ValueError(f"policy {self.name!r} needs the block bounds; run it through dyllm_fx.generate()")
        self.refresh = state.cold or state.block_start != self._block_start
        self._block_start = state.block_start

    def _span(self, state: StepState) -> tuple[int, int]:
        raise NotImplementedError

    def rows(self, layer: int, state: StepState) -> torch.Tensor | None:
        if self.refresh:
            return None
        return state.span_rows(*self._span(state))


class PrefixCachePolicy(_BlockCachePolicy):
    name = "prefix_cache"

    def _span(self, state: StepState) -> tuple[int, int]:
        return state.block_start, state.input_ids.shape[1]


class DualCachePolicy(_BlockCachePolicy):
    name = "dual_cache"

    def _span(self, state: StepState) -> tuple[int, int]:
        return state.block_start, state.block_end
