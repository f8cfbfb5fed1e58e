"""The process group a tensor-parallel model runs in, and how to start one.

Tensor parallelism (``transform(model, tensor_parallel_size=N)``) runs one process per shard,
all executing the same program on the same inputs (SPMD): each holds 1/N of the attention heads
and of the MLP, and the partial results are summed with one all-reduce after each attention and
MLP block. Every data-dependent decision (DyLLM's salient rows, dLLM-Cache's refreshed rows, the
sampler's tokens) is taken from replicated or all-reduced values, so all ranks take it alike and
every rank holds the same tokens.

Start the ranks with ``torchrun --nproc-per-node N script.py`` (the script calls
:func:`init_tensor_parallel`), or from Python with :func:`spawn`. NCCL on CUDA, gloo on CPU.

The collectives are torch.distributed's functional ones (``_functional_collectives``): they are
graph ops, so the captured step keeps them and ``torch.compile(fullgraph=True)`` compiles the
sharded step whole.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from .errors import UsageError
from .values import check_integer

# A rank that dies leaves the others waiting in a collective: they fail after this long
# instead of hanging (torch.distributed's own default is 30 minutes).
DEFAULT_TIMEOUT_S = 120.0

# What a collective says when the rank at its other end has gone; that rank's own error is the
# one worth reporting, so a rank that sees this waits a moment before failing in turn.
_PEER_GONE = ("closed by peer", "reset by peer", "Broken pipe", "Connection refused")
_PEER_GONE_GRACE_S = 3.0


def backend_for(device: torch.device | str | None) -> str:
    return "nccl" if torch.device(device or "cpu").type == "cuda" else "gloo"


def init_tensor_parallel(
    device: torch.device | str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[int, int]:
    """Join the process group torchrun (or :func:`spawn`) describes in the environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); returns (rank, world size).
    A group already initialised is used as it is."""
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UsageError(
                f"no process group and no {', '.join(missing)} in the environment: launch with "
                "torchrun --nproc-per-node N, or start the ranks with dyllm_fx.distributed.spawn(fn, N)"
            )
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def check_size(tensor_parallel_size) -> int:
    """``tensor_parallel_size`` as an int >= 1; a UsageError naming the argument otherwise."""
    try:
        return check_integer("tensor_parallel_size", tensor_parallel_size, minimum=1)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def group_for(tensor_parallel_size: int) -> str:
    """The name of the process group of ``tensor_parallel_size`` ranks this process belongs to
    (the default group, which must hold exactly that many ranks)."""
    check_size(tensor_parallel_size)
    if not dist.is_available() or not dist.is_initialized():
        raise UsageError(
            f"tensor_parallel_size={tensor_parallel_size} needs torch.distributed initialised with "
            f"{tensor_parallel_size} ranks: launch with torchrun --nproc-per-node {tensor_parallel_size} "
            "and call dyllm_fx.distributed.init_tensor_parallel(), or start the ranks with "
            f"dyllm_fx.distributed.spawn(fn, {tensor_parallel_size})"
        )
    world = dist.get_world_size()
    if world != tensor_parallel_size:
        raise UsageError(
            f"tensor_parallel_size={tensor_parallel_size} but the process group has {world} ranks; "
            f"launch {tensor_parallel_size} ranks (one group per model)"
        )
    return dist.group.WORLD.group_name


def sum_over_shards(tensor: torch.Tensor, group: str | None) -> torch.Tensor:
    """``tensor`` summed over the ranks of ``group`` (itself when ``group`` is None): a graph op."""
    if group is None:
        return tensor
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(tensor, "sum", group)


def free_local_port() -> int:
    """A free port on 127.0.0.1, for rank 0 of a group on this machine to host it on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_local_group(
    rank: int, size: int, port: int, device=None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Join, as ``rank``, the process group of ``size`` ranks on this machine that rank 0 hosts
    on 127.0.0.1:``port`` (the environment torchrun would set, then :func:`init_tensor_parallel`)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_tensor_parallel(device, timeout_s)


def _rank_main(rank: int, fn: Callable, world: int, port: int, device, timeout_s: float, args) -> None:
    join_local_group(rank, world, port, device, timeout_s)
    try:
        fn(rank, *args)
    except Exception as err:
        if any(text in str(err) for text in _PEER_GONE):
            # mp.spawn reports the first rank to exit: let the rank that failed first be that one.
            time.sleep(_PEER_GONE_GRACE_S)
        raise
    finally:
        dist.destroy_process_group()


def spawn(
    fn: Callable,
    tensor_parallel_size: int,
    *args,
    device: torch.device | str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Run ``fn(rank, *args)`` in ``tensor_parallel_size`` processes on this machine, each in the
    process group (127.0.0.1, a free port). ``fn`` must be importable (a module-level function).
    When a rank raises, the others are stopped and the error is raised here with its traceback
    (the failing rank's own error, in preference to its peers' reports that it has gone)."""
    import torch.multiprocessing as mp

    check_size(tensor_parallel_size)
    mp.spawn(
        _rank_main,
        args=(fn, tensor_parallel_size, free_local_port(), device, timeout_s, args),
        nprocs=tensor_parallel_size,
        join=True,
    )


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "check_size",
    "free_local_port",
    "group_for",
    "init_tensor_parallel",
    "join_local_group",
    "spawn",
    "sum_over_shards",
]
