"""CUDA-graph replay of warm sparse steps for policies that recompute one row set in every layer.

At batch 1 on a GPU the eager step is host-bound: the kernels of a 10%-active step take a third
of the vanilla forward's GPU time, but launching them (Python, dispatch, Triton launchers) takes
longer than the forward. A warm step of a *layer-uniform* policy (``dense``, ``fixed``,
``prefix_cache``, ``dual_cache``: the host picks one row set per step, no decision inside the
step) is a fixed sequence of kernels for a given (batch, sequence, row-bucket, logit-positions)
shape, so it is captured once per shape and replayed:

    static inputs  <- this step's input_ids, attention_mask, position_ids, rows, logit_positions
    graph.replay()    prologue, every layer on `rows`, the LM head: the caches are updated in place
    logits          = a copy of the static output

The caches are the engine's own tensors (their addresses never change within a generation), so
the replayed kernels read and write them directly. Policies that decide inside the step (DyLLM,
ES-dLLM, dLLM-Cache) read values back to the host and run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: tuple[torch.Tensor, ...]
    logits: torch.Tensor


class StepGraphs:
    """Captured warm steps, one per input shape; ``body(*inputs) -> logits`` is the step."""

    def __init__(self, body: Callable[..., torch.Tensor]):
        self.body = body
        self._captured: dict[tuple, _Captured] = {}

    def clear(self) -> None:
        """Forget every graph (the caches they point at were reallocated)."""
        self._captured.clear()

    def __len__(self) -> int:
        return len(self._captured)

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self._captured.get(key)
        if entry is None:
            entry = self._capture(inputs)
        else:
            for static, value in zip(entry.inputs, inputs):
                static.copy_(value)
        entry.graph.replay()
        return entry.logits.clone()

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        static = tuple(t.clone() for t in inputs)
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its workspace), as CUDA
        # graph capture requires. A warm step with fixed inputs is idempotent: the prologue
        # rewrites the first hidden state and each layer rewrites the same rows from it.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.body(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.body(*static)
        entry = _Captured(graph, static, logits)
        self._captured[tuple((tuple(t.shape), t.dtype) for t in inputs)] = entry
        return entry


__all__ = ["StepGraphs"]
