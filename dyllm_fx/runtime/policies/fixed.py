"""``fixed``: a given set of positions is recomputed at every step; every other row reuses
the cache (after the first, full step). For tests and for what-if measurements."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import HostState
from .uniform import UniformPolicy


class FixedPolicy(UniformPolicy):
    name = "fixed"

    def __init__(self, rows: Sequence[int] | torch.Tensor):
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.dim() not in (1, 2) or rows.numel() == 0:
            raise ValueError("fixed policy needs a non-empty 1-D list of positions or a (batch, n) tensor")
        self.index = rows

    def rows(self, host: HostState) -> torch.Tensor:
        if int(self.index.max()) >= host.seq_len or int(self.index.min()) < 0:
            raise ValueError(
                f"fixed policy positions must lie in [0, {host.seq_len}); got {self.index.tolist()}"
            )
        idx = self.index.to(host.device)
        return idx.expand(host.batch, -1) if idx.dim() == 1 else idx
