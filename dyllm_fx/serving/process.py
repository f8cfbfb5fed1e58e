"""``ServerProcess``: ``dyllm serve`` in a child process, for tests, benchmarks and notebooks.

    with ServerProcess("--policy", "dual_cache") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        ...

It binds 127.0.0.1 at a free port (``--port 0``; the child prints the URL it got), waits until
the child listens, and stops it on exit: SIGTERM, then SIGKILL if it does not end in time. The
child also gets ``--lifetime`` so that it ends by itself should the parent die without
cleaning up. Imports neither torch nor FastAPI.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time

_URL = re.compile(r"listening on (http://\S+?:\d+)")


class ServerProcess:
    """A running ``dyllm serve`` child; ``url`` (``http://127.0.0.1:PORT``) once it listens.

    Args:
        *args: more ``dyllm serve`` options (``--policy``, ``--max-num-seqs``, ...).
        threads: the child's torch CPU threads (``--threads``).
        lifetime_s: the child stops by itself after this many seconds, whatever happens here.
        start_timeout_s: how long loading the model may take; past it (or when the child exits
            first) a RuntimeError carries the child's log.
    """

    def __init__(
        self, *args: str, threads: int = 1, lifetime_s: float = 900.0, start_timeout_s: float = 180.0
    ):
        cmd = [
            sys.executable,
            "-m",
            "dyllm_fx.cli.main",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--threads",
            str(threads),
            "--lifetime",
            str(lifetime_s),
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.log: list[str] = []
        lines: queue.Queue[str] = queue.Queue()
        # drained for the child's whole life: a full stderr pipe would block it
        threading.Thread(target=self._drain, args=(lines,), daemon=True).start()
        self.url: str | None = None
        deadline = time.monotonic() + start_timeout_s
        try:
            while self.url is None:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"dyllm serve exited with code {self.proc.returncode} before listening:\n"
                        + self.output()
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"dyllm serve did not listen within {start_timeout_s:.0f} s:\n" + self.output()
                    )
                try:
                    match = _URL.search(lines.get(timeout=0.5))
                except queue.Empty:
                    continue
                if match:
                    self.url = match.group(1)
        except BaseException:
            self.stop()
            raise

    def _drain(self, lines: queue.Queue) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            lines.put(line)

    def output(self) -> str:
        """What the child wrote to stderr so far."""
        return "".join(self.log)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the child (SIGTERM, then SIGKILL after ``timeout_s``) and reap it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["ServerProcess"]
