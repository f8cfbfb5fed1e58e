"""CUDA-graph replay of warm steps, for every policy.

At batch 1 on a GPU an eager step is host-bound: launching its kernels (Python, dispatch,
Triton launchers) takes longer than running them. A policy's step has no host read and no
data-dependent shape, so for a given plan key and input shapes it is a fixed sequence of
kernels: it is captured once and replayed.

    static inputs  <- this step's tensors (tokens, mask, positions, logit positions, plan tensors)
    graph.replay()    the whole step: caches and policy buffers are updated in place
    outputs         = copies of the static outputs (logits, eligible mask, counts)

The caches and buffers are the engine's own tensors, whose addresses never change within a
generation, so the replayed kernels read and write them directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor | None, ...]


class StepGraphs:
    """Captured steps, one per (plan key, input shapes)."""

    def __init__(self):
        self._captured: dict[tuple, _Captured] = {}

    def clear(self) -> None:
        """Forget every graph (the caches they point at were reallocated)."""
        self._captured.clear()

    def __len__(self) -> int:
        return len(self._captured)

    def run(
        self,
        key: tuple,
        body: Callable[..., tuple],
        inputs: tuple[torch.Tensor, ...],
        state: list[torch.Tensor],
    ) -> tuple:
        """``body(*inputs)`` -> a tuple of tensors (or None), replayed from a graph. ``state``:
        every tensor the step updates in place (restored after the capture's warm-up run)."""
        full_key = (key, *((tuple(t.shape), t.dtype) for t in inputs))
        entry = self._captured.get(full_key)
        if entry is None:
            entry = self._captured[full_key] = self._capture(body, inputs, state)
        else:
            for static, value in zip(entry.inputs, inputs):
                static.copy_(value)
        entry.graph.replay()
        return tuple(None if t is None else t.clone() for t in entry.outputs)

    @staticmethod
    def _capture(
        body: Callable[..., tuple], inputs: tuple[torch.Tensor, ...], state: list[torch.Tensor]
    ) -> _Captured:
        static = tuple(t.clone() for t in inputs)
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its workspace), as CUDA
        # graph capture requires. A step is not idempotent (DyLLM compares with the tokens and
        # contexts it last saw), so the state the warm-up changed is put back before the
        # capture; the replay below then runs the step the caller asked for exactly once.
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body(*static)
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(state, saved):
            t.copy_(s)
        del saved
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = body(*static)
        return _Captured(graph, static, tuple(outputs))


__all__ = ["StepGraphs"]
