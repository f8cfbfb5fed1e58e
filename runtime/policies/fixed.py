"""``fixed``: a given set of positions is recomputed at every step; every other row reuses
the cache (after the first, full step). For tests and for what-if measurements."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Policy, StepState


class FixedPolicy(Policy):
    layer_uniform = True
    name = "fixed"

    def __init__(self, rows: Sequence[int] | torch.Tensor):
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.dim() not in (1, 2) or rows.numel() == 0:
            raise ValueError("fixed policy needs a non-empty 1-D list of positions or a (batch, n) tensor")
        self.index = rows

    def rows(self, layer: int, state: StepState) -> torch.Tensor:
        seq_len = state.input_ids.shape[1]
        if int(self.index.max()) >= seq_len or int(self.index.min()) < 0:
            raise ValueError(f"fixed policy positions must lie in [0, {seq_len}); got {self.index.tolist()}")
        idx = self.index.to(state.input_ids.device)
        return idx.expand(state.input_ids.shape[0], -1) if idx.dim() == 1 else idx
