"""Branches (step graphs) exported side by side in forked worker processes.

Each branch's export (torch.export, decompositions, lowering) is single-threaded Python, so on a
multi-core CPU the branches run in parallel: the workers are forked after the step is built, so
they share the model without pickling it, and each returns its branch's ONNX graph serialized.
A forked child inherits the tracing context (``plain_torch_ops``, ``torch.no_grad``) of the
thread that forks. Fork is used only where it is safe: a CPU model, a platform with ``fork``.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator

import torch

MAX_WORKERS = 8  # each worker holds one graph's trace (hundreds of MB for a small model)

# The job the forked workers run: set just before the pool forks, read in the children.
_JOB: Callable[[int], object] | None = None


def default_workers(n_graphs: int, device: torch.device) -> int:
    """Processes for ``n_graphs`` graphs: one per usable core up to :data:`MAX_WORKERS`; 1 (this
    process) for a non-CPU model or where ``fork`` is missing."""
    if torch.device(device).type != "cpu" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(n_graphs, cores, MAX_WORKERS))


def _run(i: int) -> tuple[int, bytes]:
    import onnx_ir as ir

    torch.set_num_threads(1)  # tracing is Python-bound; one thread per worker process
    return i, ir.to_proto(_JOB(i)).SerializeToString()


def run_forked(job: Callable[[int], object], n: int, workers: int) -> Iterator[tuple[int, object]]:
    """``(i, job(i))`` for i in range(n), in completion order; ``job`` returns an onnx_ir model,
    run in ``workers`` forked processes (in this process when ``workers`` is 1)."""
    global _JOB
    if workers <= 1 or n <= 1:
        for i in range(n):
            yield i, job(i)
        return
    import onnx
    import onnx_ir as ir

    _JOB = job
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for i, data in pool.imap_unordered(_run, range(n)):
                yield i, ir.from_proto(onnx.ModelProto.FromString(data))
    finally:
        _JOB = None


__all__ = ["MAX_WORKERS", "default_workers", "run_forked"]
