"""When a row-level policy recomputes the whole sequence: a small clock shared by policies."""

from __future__ import annotations

from .base import StepState


class RefreshClock:
    """Full refresh at a cold cache, at the first step of each block (when ``on_new_block``),
    and every ``interval`` steps since the last refresh."""

    def __init__(self, interval: int, on_new_block: bool = True, name: str = "refresh_interval"):
        if int(interval) < 1:
            raise ValueError(f"{name} must be >= 1 step; got {interval}")
        self.interval = int(interval)
        self.on_new_block = on_new_block
        self._block_start: int | None = None
        self._since = 0
        # Whether the last refresh was forced by the cache or the block (cold, stale, new
        # block) rather than by the interval: composed with a block cache, only such a refresh
        # must reach rows outside the current block.
        self.forced = False

    def tick(self, state: StepState, force: bool = False) -> bool:
        """Advance one step; True when this step must be a full refresh."""
        new_block = self.on_new_block and state.block_start is not None and state.block_start != self._block_start
        self.forced = force or state.cold or new_block
        refresh = self.forced or self._since >= self.interval
        self._since = 1 if refresh else self._since + 1
        self._block_start = state.block_start
        return refresh
