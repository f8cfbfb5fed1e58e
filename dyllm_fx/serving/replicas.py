"""Replicas of the OpenAI-compatible server on Ray Serve (``dyllm serve --replicas N``).

One server process decodes one batch stream on one device; a replica is a copy of that whole
server (model, scheduler, engine thread, FastAPI app) in a Ray actor of its own. Ray Serve's
HTTP proxy takes every request and hands it to one replica, so the endpoints, their bodies and
their streaming are those of ``dyllm serve`` (``server.py``) exactly. Replicas are for load;
a model too large for one device needs tensor parallelism instead.

    from dyllm_fx.serving.replicas import ReplicaConfig, openai_deployment
    from ray import serve

    app = openai_deployment(ReplicaConfig("default", policy="dual_cache"), num_replicas=2)
    serve.run(app, route_prefix="/")  # http://127.0.0.1:8000/v1/completions

Each replica builds its engine from a :class:`ReplicaConfig` (plain, picklable values: a model
name or folder, not a model object), so it loads the weights itself on whichever node Ray
places it: a model folder must exist at the same path on every node of a multi-node cluster.

Ray is an optional extra (``pip install "dyllm-fx[ray]"``); nothing here imports it at module
level.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import MissingDependencyError, UsageError
from ..values import check_integer, check_number
from .net import free_port, require_server_packages
from .server_config import ReplicaConfig

APP_NAME = "dyllm"
# how often Ray asks a replica whether its engine still runs (a stopped one is replaced)
HEALTH_CHECK_PERIOD_S = 2.0
# how long Ray Serve's HTTP proxy may take to start before Ray kills it (Ray's default: 5 s)
PROXY_READY_TIMEOUT_S = 60.0


def require_ray() -> None:
    """A MissingDependencyError with the pip command when Ray Serve is missing."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise MissingDependencyError(
            'replicas run on Ray Serve, which is not installed; install it with pip install "dyllm-fx[ray]" '
            '(from a checkout: pip install -e ".[ray]"), or leave out --replicas for one server process'
        )
    require_server_packages()


def check_replica_gpus(tensor_parallel_size: int, gpus_per_replica: float) -> None:
    """A replica on GPUs runs one tensor-parallel rank per GPU: refuse fewer (0: a CPU replica)."""
    if 0 < gpus_per_replica < tensor_parallel_size:
        raise UsageError(
            f"a replica of tensor_parallel_size={tensor_parallel_size} runs one rank per GPU: give it "
            f"--gpus-per-replica {tensor_parallel_size} (got {gpus_per_replica:g})"
        )


def _build_replica_app(config: ReplicaConfig):
    """The FastAPI app of one replica, its engine thread started (runs inside the replica).
    A tensor-parallel replica is rank 0 of its own ranks, which it starts beside itself."""
    from .async_engine import AsyncEngine
    from .server import build_app

    if config.tensor_parallel_size > 1:
        from .tensor_parallel import lead_ranks

        llm, _THIS_REPLICA.followers = lead_ranks(config)
    else:
        llm = config.build_llm()
    _THIS_REPLICA.engine = AsyncEngine(llm.engine, threads=config.threads).start()
    return build_app(_THIS_REPLICA.engine, config.served_model_name or config.model, llm.policy_name)


@dataclasses.dataclass
class _ReplicaState:
    """What the replica in this process runs (a Ray Serve replica is a process of its own)."""

    engine: Any = None  # the AsyncEngine
    followers: list = dataclasses.field(default_factory=list)  # tensor-parallel ranks 1..N-1

    def check_health(self) -> None:
        if self.engine is not None and not self.engine.alive:
            raise RuntimeError(f"the engine thread stopped ({self.engine.error!r})")
        for process in self.followers:
            if not process.is_alive():
                raise RuntimeError(f"tensor-parallel rank {process.name} exited with code {process.exitcode}")


_THIS_REPLICA = _ReplicaState()


class OpenAIServer:
    """The deployment's class: Ray Serve calls :meth:`check_health` every few seconds and
    replaces a replica whose engine (or a rank of it) stopped."""

    def check_health(self) -> None:
        _THIS_REPLICA.check_health()


def openai_deployment(
    config: ReplicaConfig,
    num_replicas: int = 1,
    max_replicas: int | None = None,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
):
    """A Ray Serve application of ``num_replicas`` OpenAI-compatible servers.

    ``max_replicas`` above ``num_replicas`` turns on Ray's autoscaling between the two, aiming
    at ``config.max_num_seqs`` requests in flight per replica (one full batch each).
    ``cpus_per_replica`` / ``gpus_per_replica`` are the Ray resources each replica holds (a
    replica sees only the GPUs Ray gives it; a tensor-parallel replica needs one per rank, and
    runs its ranks as processes beside it). A replica whose engine stops (a rank of it lost) fails
    Ray's health check and is replaced. Run it with ``ray.serve.run(app, route_prefix="/")``.
    """
    require_ray()
    try:
        check_integer("num_replicas", num_replicas, minimum=1)
        check_integer("max_replicas", max_replicas, minimum=num_replicas, allow_none=True)
        check_number("cpus_per_replica", cpus_per_replica, minimum=0)
        check_number("gpus_per_replica", gpus_per_replica, minimum=0)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    from ray import serve

    tp = config.tensor_parallel_size
    if tp > 1:
        from ..loading import check_tensor_parallel

        check_tensor_parallel(config.model, tp)  # heads that do not divide: before Ray starts
    check_replica_gpus(tp, gpus_per_replica)
    options: dict[str, Any] = {
        "name": "OpenAIServer",
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        # a request is one HTTP call that may hold several completions; let a replica's
        # scheduler, not the proxy, decide how many decode at once
        "max_ongoing_requests": max(config.max_num_seqs * 4, 8),
    }
    if max_replicas is not None and max_replicas > num_replicas:
        options["autoscaling_config"] = {
            "min_replicas": num_replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": config.max_num_seqs,
        }
    else:
        options["num_replicas"] = num_replicas

    def build_app():  # Ray takes a plain function of no arguments as an app builder
        return _build_replica_app(config)

    server = serve.deployment(serve.ingress(build_app)(OpenAIServer), **options)
    return server.bind()


def run_replicas(
    config: ReplicaConfig,
    num_replicas: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_replicas: int | None = None,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    ray_address: str | None = None,
    lifetime_s: float | None = None,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Start (or join, with ``ray_address`` / ``RAY_ADDRESS``) a Ray cluster, deploy the
    replicas behind Ray Serve's proxy on ``host:port`` and serve until interrupted (or for
    ``lifetime_s`` seconds). ``port`` 0: a free port, announced."""
    # the deployment is only a description until serve.run: built (and its arguments checked)
    # before any Ray process starts
    app = openai_deployment(config, num_replicas, max_replicas, cpus_per_replica, gpus_per_replica)
    import ray
    from ray import serve

    port = port or free_port(host)
    # Ray Serve kills an HTTP proxy not ready within 5 s; on a machine busy loading models its
    # worker can take longer to start, and serve.start then fails on the killed actor
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(PROXY_READY_TIMEOUT_S))
    _interrupt_on_sigterm()  # ServerProcess and service managers stop with SIGTERM: shut Ray down too
    ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as err:
            raise UsageError(
                f"the replicas did not start: {err}; run `dyllm serve` without --replicas to see the "
                "model's own error"
            ) from None
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}"
        if announce is not None:
            announce(url)
        else:
            print(
                f"dyllm serve: listening on {url} (model {config.served_model_name or config.model!r}, "
                f"policy {config.policy!r}, {num_replicas} replica(s) on Ray Serve)",
                file=sys.stderr,
                flush=True,
            )
        deadline = None if lifetime_s is None else time.monotonic() + lifetime_s
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.2 if deadline is None else min(0.2, max(deadline - time.monotonic(), 0)))
        except KeyboardInterrupt:
            pass
    finally:
        serve.shutdown()
        ray.shutdown()


def _interrupt_on_sigterm() -> None:
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


__all__ = [
    "APP_NAME",
    "OpenAIServer",
    "ReplicaConfig",
    "check_replica_gpus",
    "openai_deployment",
    "require_ray",
    "run_replicas",
]
