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

from .base import HostState
from .uniform import UniformPolicy


class _BlockCachePolicy(UniformPolicy):
    def __init__(self):
        self._block_start: int | None = None

    def reset(self) -> None:
        self._block_start = None

    def span(self, host: HostState) -> tuple[int, int] | None:
        new_block = host.block_start != self._block_start
        self._block_start = host.block_start
        return None if new_block else self._span(host)

    def plan(self, host: HostState):
        if host.block_start is None:
            raise ValueError(
                f"policy {self.name!r} needs the block bounds; run it through dyllm_fx.generate()"
            )
        if host.cold:  # a cold step is the block's refresh: its next step is a warm one
            self._block_start = host.block_start
        return super().plan(host)

    def _span(self, host: HostState) -> tuple[int, int]:
        raise NotImplementedError


class PrefixCachePolicy(_BlockCachePolicy):
    name = "prefix_cache"

    def _span(self, host: HostState) -> tuple[int, int]:
        return host.block_start, host.seq_len


class DualCachePolicy(_BlockCachePolicy):
    name = "dual_cache"

    def _span(self, host: HostState) -> tuple[int, int]:
        return host.block_start, host.block_end
