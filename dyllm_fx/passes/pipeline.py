"""The one pass pipeline: a captured step graph in, the :class:`StepProgram` the runtime runs out.

Every caller (``dyllm_fx.transform``, the dynamo backend, each model adapter) captures the step
its own way (what to trace is the adapter's trace layout) and hands the graph to
:data:`PASSES`, an ordered list of named passes configured here and only here::

    check_bidirectional  refuse causal attention (rewrites nothing)
    find_blocks          the transformer blocks, from the graph's data flow
    split_pieces         prologue | attn_i | mlp_i | epilogue, each on a subset of rows
    split_attention      each attn_i also cut at its core into query | kv | post (DyLLM's layers)
    rewrite_attention    each core into cache writes + partial attention

Each pass reads and fills a :class:`PassState`; a pipeline with other passes (a test leaving
one out, a future sharding pass) is ``PassPipeline([...])`` over the same state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .capture import CapturedGraph
from .check_bidirectional import check_bidirectional
from .find_blocks import BlockMatch, find_blocks
from .rewrite_attention import rewrite_attention
from .split_attention import split_attention
from .split_pieces import StepProgram, split_pieces


@dataclass
class PassState:
    """What the passes hand each other: the captured graph and the inputs it was traced with,
    then the blocks found in it and the program cut from them."""

    captured: CapturedGraph
    example_inputs: tuple[torch.Tensor, ...]
    blocks: list[BlockMatch] | None = None
    program: StepProgram | None = None


@dataclass(frozen=True)
class Pass:
    """One named pass: reads and fills the :class:`PassState`."""

    name: str
    run: Callable[[PassState], None]


def _check_bidirectional(state: PassState) -> None:
    check_bidirectional(state.captured.gm, state.example_inputs)


def _find_blocks(state: PassState) -> None:
    state.blocks = find_blocks(state.captured.gm)


def _split_pieces(state: PassState) -> None:
    state.program = split_pieces(state.captured, state.blocks)


def _split_attention(state: PassState) -> None:
    state.program.attn_parts = [split_attention(piece) for piece in state.program.attn]


def _rewrite_attention(state: PassState) -> None:
    for piece in state.program.attn:
        rewrite_attention(piece)


class PassPipeline:
    """An ordered list of named passes, run one after the other on a captured graph."""

    def __init__(self, passes: Sequence[Pass]):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"pass names must be unique, got {names}")
        self.passes = tuple(passes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.passes)

    def run(self, captured: CapturedGraph, example_inputs: tuple[torch.Tensor, ...]) -> StepProgram:
        """Run every pass on ``captured`` (traced with ``example_inputs``, which the checks
        evaluate the graph on) and return the program they built."""
        state = PassState(captured, tuple(example_inputs))
        for p in self.passes:
            p.run(state)
        if state.program is None:
            raise ValueError(f"the passes {list(self.names)} built no program; include split_pieces")
        return state.program


PASSES = PassPipeline(
    (
        Pass("check_bidirectional", _check_bidirectional),
        Pass("find_blocks", _find_blocks),
        Pass("split_pieces", _split_pieces),
        Pass("split_attention", _split_attention),
        Pass("rewrite_attention", _rewrite_attention),
    )
)


__all__ = ["PASSES", "Pass", "PassPipeline", "PassState"]
