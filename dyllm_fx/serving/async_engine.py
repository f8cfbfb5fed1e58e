"""``AsyncEngine``: the serving engine in a thread of its own, with asyncio streams of outputs.

The engine thread loops ``ServingEngine.step()`` while there is work and sleeps on an event
otherwise. Each submitted call (one HTTP request: one or more prompts) registers an
``asyncio.Queue`` on the caller's event loop; the engine thread hands every output to that
queue with ``loop.call_soon_threadsafe``. Submitting and aborting are thread-safe and never
wait for a step to finish.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

import torch

from ..errors import EngineStoppedError
from .engine import ServingEngine
from .outputs import RequestOutput
from .sequence import Request

log = logging.getLogger("dyllm_fx.serving")


class Stream:
    """The outputs of one submitted call (its requests), in the order the engine made them."""

    def __init__(self, requests: list[Request], loop: asyncio.AbstractEventLoop):
        self.requests = requests
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.loop = loop
        self.pending = {r.request_id for r in requests}

    @property
    def finished(self) -> bool:
        return not self.pending

    async def next(self, timeout: float | None = None) -> RequestOutput:
        """The next output (TimeoutError after ``timeout`` seconds without one)."""
        out = await asyncio.wait_for(self.queue.get(), timeout)
        if out.finished:
            self.pending.discard(out.request_id)
        return out

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            yield await self.next()


class AsyncEngine:
    """Runs ``engine`` in a daemon thread (:meth:`start`, :meth:`shutdown`).

    ``threads``: torch CPU threads for the engine thread (None: leave torch's setting)."""

    def __init__(self, engine: ServingEngine, threads: int | None = None, idle_wait_s: float = 0.1):
        self.engine = engine
        self.threads = threads
        self.idle_wait_s = idle_wait_s
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "AsyncEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dyllm-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, requests: list[Request]) -> Stream:
        """Queue ``requests`` (made with ``engine.make_request``) as one call; raises
        :class:`~dyllm_fx.serving.QueueFull` when the queue has no room, EngineStoppedError when
        the engine thread is gone. Call from a coroutine."""
        self._check_running()
        stream = Stream(requests, asyncio.get_running_loop())
        with self._lock:
            for r in requests:
                self._streams[r.request_id] = stream
        try:
            self.engine.add_requests(requests)
        except BaseException:
            with self._lock:
                for r in requests:
                    self._streams.pop(r.request_id, None)
            raise
        self._wake.set()
        if self.error is not None:  # the thread died while these were queued: answer them
            for out in self.engine.fail_all(self.error):
                self._dispatch(out)
        return stream

    def _check_running(self) -> None:
        if self.error is not None:
            raise EngineStoppedError(
                f"the engine stopped ({type(self.error).__name__}: {self.error}); restart the server"
            )

    def abort(self, stream: Stream) -> None:
        """Cancel the call's unfinished requests (a client went away)."""
        for request_id in list(stream.pending):
            self.engine.abort(request_id)
        self._wake.set()

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            while not self._stop.is_set():
                if not self.engine.has_unfinished():
                    self.engine.idle()
                    self._wake.wait(self.idle_wait_s)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._dispatch(out)
        except BaseException as err:  # a bug, or a lost tensor-parallel rank: on /health
            self.error = err
            log.exception("the engine thread stopped")
            for out in self.engine.fail_all(err):  # nobody waits for an answer that cannot come
                self._dispatch(out)

    def _dispatch(self, out: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.get(out.request_id)
            if stream is not None and out.finished:
                del self._streams[out.request_id]
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
        except RuntimeError:  # the caller's loop is closed: nobody listens any more
            pass


__all__ = ["AsyncEngine", "Stream"]
