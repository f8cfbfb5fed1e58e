"""The scheduler: a bounded waiting queue, batches side by side, admission at block boundaries.

* Rows (one per completion) wait in arrival order. The queue holds at most
  ``max_queue_size`` rows; a request that does not fit is refused (:class:`QueueFull`, HTTP 429).
* Rows whose parameters share a block clock (``Resolved.key``: block length and steps per
  block) share a batch. A waiting row joins the running batch of its key at that batch's next
  block boundary; when no batch of its key runs, a new batch starts (at most
  ``max_num_batches`` side by side). Batches take turns one denoising step at a time
  (round-robin), so no request waits for another batch to finish.
* At most ``max_num_seqs`` rows decode at once, over all batches. Capacity goes to rows in
  arrival order: a row may not take a slot an older waiting row is due (its slot is reserved
  until its batch reaches a boundary), and when an older row waits for a batch of its own
  while ``max_num_batches`` run, the other batches admit no one until one of them empties.
* Finished rows leave at the end of their block (the batch is re-laid out for the next one);
  cancelled rows stop committing at once and leave at the next block boundary.

Thread safety: ``add`` and ``abort`` may be called from any thread; everything else runs on
the engine's thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from .batch import Batch
from .sequence import Sequence


class QueueFull(RuntimeError):
    """The waiting queue has no room for the request now (HTTP 429: retry later)."""


class RequestTooLarge(ValueError):
    """The request holds more completions than the queue ever holds (HTTP 400: a retry cannot
    succeed)."""


class Scheduler:
    def __init__(self, max_num_seqs: int = 16, max_num_batches: int = 4, max_queue_size: int | None = None):
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batches", max_num_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_queue_size is not None and (
            isinstance(max_queue_size, bool) or not isinstance(max_queue_size, int) or max_queue_size < 1
        ):
            raise ValueError(
                f"max_queue_size must be an integer >= 1 or None (unbounded), got {max_queue_size!r}"
            )
        self.max_num_seqs = max_num_seqs
        self.max_num_batches = max_num_batches
        self.max_queue_size = max_queue_size
        self.waiting: deque[Sequence] = deque()
        self.batches: list[Batch] = []
        self.lock = threading.Lock()
        self._turn = 0

    # --- any thread ------------------------------------------------------------------------

    def add(self, seqs: list[Sequence]) -> None:
        """Queue ``seqs`` (all or none)."""
        if self.max_queue_size is not None and len(seqs) > self.max_queue_size:
            raise RequestTooLarge(
                f"this request asks for {len(seqs)} completions (prompts x n), more than the "
                f"{self.max_queue_size} the queue holds, so it can never be queued; split it into requests "
                f"of at most {self.max_queue_size} completions, or raise max_queue_size to {len(seqs)} or "
                f"more (dyllm serve --max-queue-size {len(seqs)})"
            )
        with self.lock:
            if self.max_queue_size is not None and len(self.waiting) + len(seqs) > self.max_queue_size:
                raise QueueFull(
                    f"the request queue is full: {len(self.waiting)} of {self.max_queue_size} completions "
                    "wait, and "
                    f"this request adds {len(seqs)}; retry later, or start the server with a larger "
                    "--max-queue-size"
                )
            self.waiting.extend(seqs)

    def abort(self, seqs: list[Sequence]) -> None:
        """Cancel ``seqs``: waiting ones leave the queue now, running ones stop committing and
        leave their batch at its next block boundary."""
        with self.lock:
            for s in seqs:
                s.cancelled = True
                s.finish("abort")
            gone = {id(s) for s in seqs}
            self.waiting = deque(s for s in self.waiting if id(s) not in gone)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(len(b) for b in self.batches)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(len(b) or not b.in_block for b in self.batches)

    # --- the engine's thread ---------------------------------------------------------------

    def open_batches(self, make_batch: Callable[[tuple], Batch]) -> None:
        """Start a batch for each waiting key that has none, while slots and batches allow."""
        with self.lock:
            free = self.max_num_seqs - self.num_running
            keys = {b.key for b in self.batches}
            for s in self.waiting:
                if free <= 0:
                    break
                if s.key not in keys:
                    if len(self.batches) >= self.max_num_batches:
                        break
                    self.batches.append(make_batch(s.key))
                    keys.add(s.key)
                free -= 1

    def next_batch(self) -> Batch | None:
        """The batch whose turn it is (round-robin)."""
        if not self.batches:
            return None
        batch = self.batches[self._turn % len(self.batches)]
        self._turn += 1
        return batch

    def admit(self, batch: Batch) -> list[Sequence]:
        """The waiting rows that join ``batch`` now (it is at a block boundary), in arrival order."""
        with self.lock:
            free = self.max_num_seqs - self.num_running
            keys = {b.key for b in self.batches}
            joining = []
            for s in self.waiting:
                if free <= 0:
                    break
                if s.key == batch.key:
                    joining.append(s)
                elif s.key not in keys and len(self.batches) >= self.max_num_batches:
                    break  # an older row waits for a batch of its own: let this one drain
                free -= 1  # ours, or reserved for an older row of another key
            if joining:
                taken = {id(s) for s in joining}
                self.waiting = deque(s for s in self.waiting if id(s) not in taken)
            return joining

    def remove(self, batch: Batch) -> None:
        with self.lock:
            self.batches = [b for b in self.batches if b is not batch]


__all__ = ["QueueFull", "Scheduler"]
