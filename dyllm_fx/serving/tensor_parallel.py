"""``dyllm serve --tensor-parallel-size N``: one server over N tensor-parallel ranks on this node.

Each rank is a process holding 1/N of the model (``LLM(..., tensor_parallel_size=N)``). Rank 0
runs the HTTP server and the scheduler; the others follow its engine step for step
(``mirror.py``). A rank that fails stops the others, and the launcher reports which rank and
why; accepted requests get an error answer rather than no answer.

Two ways to start the ranks: :func:`serve_tensor_parallel` spawns all N from a launcher (the
plain server); :func:`lead_ranks` makes the calling process rank 0 and starts the other N - 1
beside it (a Ray Serve replica, whose actor is rank 0).
"""

from __future__ import annotations

import dataclasses

import torch

from ..distributed import free_local_port, join_local_group, spawn
from ..errors import EngineStoppedError, UsageError
from ..loading import check_tensor_parallel
from ..options import resolve_device
from .mirror import EngineMirror, follow
from .server_config import ReplicaConfig


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
    device = _check_ranks(config)
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


def _check_ranks(config: ReplicaConfig) -> torch.device:
    """The ranks' device type, once the model's heads are known to divide by the size and the
    GPUs (on CUDA) to suffice; a UsageError naming the fix otherwise, before any rank starts."""
    size = config.tensor_parallel_size
    check_tensor_parallel(config.model, size)
    device = resolve_device(config.device)
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise UsageError(
            f"tensor_parallel_size={size} needs {size} GPUs (one per rank); this process sees "
            f"{torch.cuda.device_count()}: lower --tensor-parallel-size (replicas: give each "
            f"--gpus-per-replica {size})"
        )
    return device


def _build_rank(rank: int, config: ReplicaConfig):
    """(this rank's LLM, the engine mirror), in the process group already joined; every rank
    builds them in this order (each makes process groups)."""
    # every rank draws the same numbers for unseeded sampling (each must pick the same tokens)
    torch.manual_seed(0)
    if resolve_device(config.device).type == "cuda":
        torch.cuda.set_device(rank)
        config = dataclasses.replace(config, device=f"cuda:{rank}")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    llm = config.build_llm()
    mirror = EngineMirror()
    if rank == 0:
        llm.engine.mirror = mirror
    return llm, mirror


def _serve_rank(rank: int, config: ReplicaConfig, host: str, port: int, log_level: str, lifetime_s) -> None:
    from .server import serve

    llm, mirror = _build_rank(rank, config)
    if rank != 0:
        follow(llm.engine, mirror)
        return
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


def lead_ranks(config: ReplicaConfig):
    """Make this process rank 0 of ``config.tensor_parallel_size`` ranks and start the others
    here (daemon processes, on a free port of 127.0.0.1); returns (rank 0's LLM, its engine
    already leading the others through the mirror, the follower processes). A follower that
    fails leaves rank 0's next step or heartbeat failing, which stops its engine thread."""
    import torch.multiprocessing as mp

    size = config.tensor_parallel_size
    device = _check_ranks(config)
    port = free_local_port()
    context = mp.get_context("spawn")
    followers = [
        context.Process(
            target=_follow_rank, args=(rank, size, port, config), daemon=True, name=f"dyllm-rank-{rank}"
        )
        for rank in range(1, size)
    ]
    for process in followers:
        process.start()
    join_local_group(0, size, port, device)
    llm, _ = _build_rank(0, config)
    return llm, followers


def _follow_rank(rank: int, size: int, port: int, config: ReplicaConfig) -> None:
    join_local_group(rank, size, port, resolve_device(config.device))
    llm, mirror = _build_rank(rank, config)
    follow(llm.engine, mirror)


__all__ = ["lead_ranks", "serve_tensor_parallel"]
