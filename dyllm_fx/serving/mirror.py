"""Keeping the serving engines of tensor-parallel ranks in step (``dyllm serve --tensor-parallel-size N``).

Every rank holds a shard of the model, so every rank must run every step, on the same batch.
Rank 0 owns the HTTP server and the scheduler; the other ranks own an engine each and follow.
The engine is deterministic given what happened to it between steps (requests added, requests
cancelled) and in which order, so rank 0 journals exactly that and, before each step, sends
the journal to the others (:class:`EngineMirror`); :func:`follow` replays it on their engine and
runs the same step. The model's own collectives then meet rank for rank.

The journal travels on a gloo group of its own, also when the model's collectives run on NCCL:
it holds Python objects, and an idle server sends a heartbeat every ``heartbeat_s`` so that the
followers' wait never reaches the group's timeout (a lost rank does: the others fail with an
error instead of waiting forever).
"""

from __future__ import annotations

import datetime
import threading
import time

import torch.distributed as dist

from ..distributed import DEFAULT_TIMEOUT_S

# An idle leader sends a heartbeat this often; the followers' wait times out (a lost leader)
# well after it.
HEARTBEAT_S = 5.0


class EngineMirror:
    """One end of the journal: rank 0 calls :meth:`lead` before each step (and :meth:`heartbeat`
    when idle, :meth:`close` at the end), the other ranks call :meth:`receive`. Make it on every
    rank, in the same order relative to other process groups (it creates one)."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, heartbeat_s: float = HEARTBEAT_S):
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.rank = dist.get_rank()
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()  # the engine thread leads; the main thread closes
        self._last_sent = time.monotonic()
        self.closed = False

    def _send(self, message) -> None:
        with self._lock:
            if self.closed:
                raise RuntimeError("the engine mirror is closed")
            dist.broadcast_object_list([message], src=0, group=self.group)
            self._last_sent = time.monotonic()

    def lead(self, journal: list[tuple]) -> None:
        """Rank 0: the events since the last step, then "run a step"."""
        self._send((journal, True))

    def heartbeat(self, journal: list[tuple]) -> None:
        """Rank 0, idle: the events so far (if any) without a step, at most every ``heartbeat_s``."""
        if journal or time.monotonic() - self._last_sent >= self.heartbeat_s:
            self._send((journal, False))

    def close(self) -> None:
        """Rank 0: tell the followers to stop (idempotent)."""
        with self._lock:
            if not self.closed:
                dist.broadcast_object_list([None], src=0, group=self.group)
                self.closed = True

    def receive(self):
        """The other ranks: the next ``(journal, step)`` message, or None when rank 0 closed."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def follow(engine, mirror: EngineMirror) -> int:
    """Replay rank 0's journal on ``engine`` and run the steps it ran, until rank 0 closes the
    mirror; returns the steps run. The outputs are rank 0's to report: they are dropped here."""
    steps = 0
    while (message := mirror.receive()) is not None:
        journal, step = message
        engine.replay(journal)
        if step:
            engine.step()
            steps += 1
    return steps


__all__ = ["HEARTBEAT_S", "EngineMirror", "follow"]
