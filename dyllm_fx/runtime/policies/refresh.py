"""When a row-level policy recomputes everything: a small clock shared by policies."""

from __future__ import annotations

from .base import HostState


class RefreshClock:
    """Full refresh at a cold cache, at the first step of each block (when ``on_new_block``),
    and every ``interval`` steps since the last refresh (``interval`` None: never)."""

    def __init__(self, interval: int | None, on_new_block: bool = True, name: str = "refresh_interval"):
        if interval is not None and (isinstance(interval, bool) or int(interval) < 1):
            raise ValueError(f"{name} must be >= 1 step (or None for never); got {interval!r}")
        self.interval = None if interval is None else int(interval)
        self.on_new_block = on_new_block
        self.reset()

    def reset(self) -> None:
        self._block_start: int | None = None
        self._since = 0
        # Whether the last refresh was forced by the cache or the block (cold, new block)
        # rather than by the interval: composed with a block cache, only such a refresh must
        # reach rows outside the current block.
        self.forced = False

    def tick(self, host: HostState, force: bool = False) -> bool:
        """Advance one step; True when this step must be a refresh."""
        new_block = (
            self.on_new_block and host.block_start is not None and host.block_start != self._block_start
        )
        self.forced = force or host.cold or new_block
        refresh = self.forced or (self.interval is not None and self._since >= self.interval)
        self._since = 1 if refresh else self._since + 1
        self._block_start = host.block_start
        return refresh
