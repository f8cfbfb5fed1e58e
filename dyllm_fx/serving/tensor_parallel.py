"""``dyllm serve --tensor-parallel-size N``: one server over N tensor-parallel ranks on this node.

Each rank is a process holding 1/N of the model (``LLM(..., tensor_parallel_size=N)``). Rank 0
runs the HTTP server and the scheduler; the others follow its engine step for step
(``mirror.py``). A rank that fails stops the others, and the launcher reports which rank and
why; accepted requests get an error answer rather than no answer.
"""

from __future__ import annotations

import dataclasses

import torch

from ..distributed import spawn
from ..errors import EngineStoppedError, UsageError
from ..loading import check_tensor_parallel
from ..options import resolve_device
from .mirror import EngineMirror, follow
from .replicas import ReplicaConfig


def serve_tensor_parallel(
    config: ReplicaConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    lifetime_s: float | None = None,
    timeout_s: float | None = None,
) -> None:
    """Serve ``config`` (its ``tensor_parallel_size`` ranks) until interrupted or for
    ``lifetime_s`` seconds. On CUDA, rank r runs on ``cuda:r``. The heads must divide by the
    size and the GPUs must suffice: checked before any rank starts."""
    size = config.tensor_parallel_size
    check_tensor_parallel(config.model, size)
    device = resolve_device(config.device)
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise UsageError(
            f"tensor_parallel_size={size} needs {size} GPUs (one per rank); this machine has "
            f"{torch.cuda.device_count()}: lower --tensor-parallel-size"
        )
    options = {} if timeout_s is None else {"timeout_s": timeout_s}
    try:
        spawn(_serve_rank, size, config, host, port, log_level, lifetime_s, device=device, **options)
    except torch.multiprocessing.ProcessRaisedException as err:
        last = str(err).strip().splitlines()[-1]
        raise EngineStoppedError(f"tensor-parallel rank {err.error_index} failed: {last}") from None
    except torch.multiprocessing.ProcessExitedException as err:
        code = err.exit_code
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise EngineStoppedError(f"tensor-parallel rank {err.error_index} {how}") from None


def _serve_rank(rank: int, config: ReplicaConfig, host: str, port: int, log_level: str, lifetime_s) -> None:
    from .server import serve

    # every rank draws the same numbers for unseeded sampling (each must pick the same tokens)
    torch.manual_seed(0)
    if resolve_device(config.device).type == "cuda":
        torch.cuda.set_device(rank)
        config = dataclasses.replace(config, device=f"cuda:{rank}")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    llm = config.build_llm()
    mirror = EngineMirror()
    if rank != 0:
        follow(llm.engine, mirror)
        return
    llm.engine.mirror = mirror
    serve(
        llm.engine,
        host=host,
        port=port,
        model_name=config.served_model_name or config.model,
        threads=config.threads,
        log_level=log_level,
        lifetime_s=lifetime_s,
    )
    mirror.close()


__all__ = ["serve_tensor_parallel"]
