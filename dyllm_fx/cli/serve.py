"""``dyllm serve``: the OpenAI-compatible HTTP server (``dyllm_fx.serving.server``).

Nothing here imports torch or FastAPI at module level: ``dyllm --help`` must answer at once.
"""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .common_args import add_model_args, check_run


def add_serve_parser(sub, parents=()) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        parents=list(parents),
        help="serve a model over an OpenAI-compatible HTTP API",
        description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
        "/health, "
        "/metrics) that batches requests as they arrive: a request joins a running batch at its next "
        'block boundary. Needs pip install -e ".[serve]" (from a checkout).',
    )
    add_model_args(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument(
        "--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port, printed at start)"
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=16,
        help="completions decoding at once, over all batches (default 16)",
    )
    p.add_argument(
        "--max-num-batches",
        type=int,
        default=4,
        help="batches with different block clocks (block length, steps per block) side by side (default 4)",
    )
    p.add_argument(
        "--max-queue-size",
        type=int,
        default=256,
        help="completions that may wait; beyond it requests get HTTP 429 (default 256)",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the model name clients pass (default: --model as given)"
    )
    p.add_argument(
        "--cuda-graphs", action="store_true", help="replay each step as a CUDA graph (with --policy NAME)"
    )
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        metavar="N",
        help="shard the model over N ranks on this node (one process each, one GPU each on CUDA); "
        "for a model too large for one device (default 1)",
    )
    replicas = p.add_argument_group(
        "replicas on Ray Serve",
        'N copies of this server behind Ray Serve\'s HTTP proxy (pip install "dyllm-fx[ray]"); see '
        "docs/scaling.md",
    )
    replicas.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="serve N replicas on Ray Serve (default: one server in this process, no Ray)",
    )
    replicas.add_argument(
        "--max-replicas",
        type=int,
        default=None,
        metavar="M",
        help="autoscale between --replicas and M replicas on the requests in flight",
    )
    replicas.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (e.g. ray://head:10001 or auto; default: $RAY_ADDRESS, else a local one)",
    )
    replicas.add_argument(
        "--cpus-per-replica", type=float, default=1.0, help="Ray CPUs each replica holds (default 1)"
    )
    replicas.add_argument(
        "--gpus-per-replica", type=float, default=0.0, help="Ray GPUs each replica holds (default 0)"
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default warning)",
    )
    p.add_argument(
        "--lifetime",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop by itself after this many seconds (tests and benchmarks)",
    )
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serving.net import bind_socket, require_server_packages

    # the counts, --port and --lifetime: dyllm_fx/cli/early_checks.py, before this runs
    if args.cuda_graphs and args.policy == "vanilla":
        raise UsageError("--cuda-graphs needs --policy NAME (the untransformed model runs eagerly)")
    require_server_packages()  # FastAPI / uvicorn missing: say so before importing torch
    if args.replicas is not None:
        return _run_replicas(args)
    if args.tensor_parallel_size > 1:
        return _run_tensor_parallel(args)
    sock = bind_socket(args.host, args.port)  # a port in use: idem
    try:
        check_run(args, decoding=False)
        return _run(args, sock)
    finally:
        sock.close()


def _replica_config(args: argparse.Namespace):
    """The one server's (or each replica's) configuration from the command line: the server
    and every replica build their ``LLM`` from it, in one way."""
    from ..serving.replicas import ReplicaConfig

    return ReplicaConfig(
        model=args.model,
        policy=args.policy,
        policy_args=args.policy_args,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        max_num_batches=args.max_num_batches,
        max_queue_size=args.max_queue_size,
        threads=args.threads,
        served_model_name=args.served_model_name,
        tensor_parallel_size=args.tensor_parallel_size,
    )


def _run_replicas(args: argparse.Namespace) -> int:
    from ..serving.net import bind_socket
    from ..serving.replicas import run_replicas

    # the counts and Ray itself: dyllm_fx/cli/early_checks.py, before this runs
    bind_socket(args.host, args.port).close()  # a port in use: say so before Ray starts
    check_run(args, decoding=False)  # the model folder, policy and device, checked here once
    run_replicas(
        _replica_config(args),
        args.replicas,
        host=args.host,
        port=args.port,
        max_replicas=args.max_replicas,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
        ray_address=args.ray_address,
        lifetime_s=args.lifetime,
    )
    return 0


def _run_tensor_parallel(args: argparse.Namespace) -> int:
    from ..serving.net import bind_socket
    from ..serving.tensor_parallel import serve_tensor_parallel

    bind_socket(args.host, args.port).close()  # a port in use: say so before the ranks start
    check_run(args, decoding=False)
    serve_tensor_parallel(
        _replica_config(args),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        lifetime_s=args.lifetime,
    )
    return 0


def _run(args: argparse.Namespace, sock) -> int:
    from ..serving.server import serve

    llm = _replica_config(args).build_llm()
    serve(
        llm.engine,
        model_name=args.served_model_name or args.model,
        threads=args.threads,
        log_level=args.log_level,
        lifetime_s=args.lifetime,
        sock=sock,
    )
    return 0


__all__ = ["add_serve_parser", "cmd_serve"]
