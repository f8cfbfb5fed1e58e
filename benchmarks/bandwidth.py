"""The weight-read bound of one step (not a benchmark itself; used by ``step_gpu.py`` and
``gpu_acceptance.py``).

A cached step at batch 1 on a GPU reads every weight it multiplies by once and little else, so
no step can be faster than those bytes over the device's memory bandwidth. The bandwidth is
measured, not taken from a data sheet: a large device-to-device copy, which reads and writes
every byte once.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def measure_bandwidth(device: str, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second of a ``nbytes`` device-to-device copy (bytes read plus bytes written),
    the median of ``repeats`` copies after one warm-up; CUDA events time it on a GPU."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            dst.copy_(src)
            seconds.append(time.perf_counter() - begin)
    return 2 * nbytes / statistics.median(seconds)


def weight_read_bytes(model: nn.Module) -> int:
    """Bytes of the weights one step reads: every parameter but an untied input embedding table,
    of which a step gathers only its tokens' rows (a tied table is read whole by the LM head)."""
    config = getattr(model, "config", None)
    tied = bool(getattr(config, "weight_tying", False) or getattr(config, "tie_word_embeddings", False))
    gathered = set() if tied else {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in gathered)
