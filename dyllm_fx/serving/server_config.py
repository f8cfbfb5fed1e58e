"""What one ``dyllm serve`` server builds, in plain picklable values: the configuration the one
server, each tensor-parallel rank and each Ray Serve replica build their ``LLM`` from."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class ReplicaConfig:
    """What the server (each replica, each rank) builds: the arguments of :class:`dyllm_fx.LLM`
    (which loads the model, applies the policy and owns the serving engine) plus the server's own.

    Args:
        model: ``"default"``, a model folder or a Hub id in the local cache, as ``dyllm_fx.load``.
        policy: ``"vanilla"`` or a ``transform()`` policy; ``policy_args`` its parameters.
        threads: torch CPU threads of each replica's engine thread (None: torch's choice).
        served_model_name: the name clients pass (default: ``model``).
        tensor_parallel_size: ranks the model is sharded over (``dyllm serve
            --tensor-parallel-size``; every rank builds this LLM in a process group of that size).
    """

    model: str = "default"
    policy: str = "vanilla"
    policy_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    compile: bool | str = False
    cuda_graphs: bool = False
    dtype: str | None = None
    device: str | None = None
    max_num_seqs: int = 16
    max_num_batches: int = 4
    max_queue_size: int | None = 256
    threads: int | None = None
    served_model_name: str | None = None
    tensor_parallel_size: int = 1

    def build_llm(self):
        """The :class:`dyllm_fx.LLM` this configuration names: its model loaded, its policy
        applied, its serving engine made (``dyllm serve`` without replicas builds its one server
        from this too)."""
        from .llm import LLM

        return LLM(
            self.model,
            policy=self.policy,
            compile=self.compile,
            cuda_graphs=self.cuda_graphs,
            max_num_seqs=self.max_num_seqs,
            max_num_batches=self.max_num_batches,
            max_queue_size=self.max_queue_size,
            dtype=self.dtype,
            device=self.device,
            tensor_parallel_size=self.tensor_parallel_size,
            **dict(self.policy_args),
        )


__all__ = ["ReplicaConfig"]
