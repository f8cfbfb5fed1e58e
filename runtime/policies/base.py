"""The policy contract: which rows each layer recomputes at a step.

The sparse step asks the policy at three hook points:

* ``rows(layer, state)`` before a layer: the active rows, (B, A) int64, or None for all;
* ``after_attention(layer, rows, context)`` with the attention context of the active rows
  (B, H, A, d): may return a subset (B, A') of positions *into* ``rows`` that get the MLP,
  the others keep their cached MLP output (None: all of them);
* ``after_block(layer, rows, hidden)`` with the layer's new output for the active rows.

A step with a cold cache always runs every row, whatever the policy says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


SCOPES = ("all", "response", "block", "suffix")


def check_scope(scope: str) -> str:
    """``scope`` if it is one of :data:`SCOPES` (see :meth:`StepState.span`), else a ValueError."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}; got {scope!r}")
    return scope


@dataclass
class StepState:
    """What a policy may look at when it decides."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor | None
    step: int  # forward evaluations so far in this generation
    block_start: int | None  # current block bounds, when the caller is the denoising loop
    block_end: int | None
    cold: bool  # the cache is empty: every row runs
    response_start: int | None = None  # first response position (None: unknown, e.g. forward())
    cache: object | None = None  # the engine's StepCache (K/V/hidden per layer), read-only for policies
    # kv_probe(layer, rows) -> (k, v) of those rows from their current layer input, without
    # writing anything (dLLM-Cache compares them with the cached V).
    kv_probe: object | None = None
    q_probe: object | None = None  # q_probe(layer, rows) -> q (B, H, A, d), likewise
    mask_token_id: int | None = None  # when the engine knows the model's diffusion spec

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def span(self, scope: str) -> tuple[int, int]:
        """The [start, end) rows a row-level policy works on: ``all``, ``response`` (prompt
        frozen between refreshes), ``block`` (dual-cache composition: the current block) or
        ``suffix`` (prefix-cache composition: the current block and everything after it)."""
        if scope == "all" or self.block_start is None:
            return 0, self.seq_len
        if scope == "response":
            return (self.response_start if self.response_start is not None else 0), self.seq_len
        if check_scope(scope) == "block":
            return self.block_start, self.block_end
        return self.block_start, self.seq_len  # "suffix"

    def span_rows(self, start: int, end: int) -> torch.Tensor:
        """The row set (B, end - start) of positions [start, end) for every batch element."""
        return torch.arange(start, end, device=self.input_ids.device).expand(self.input_ids.shape[0], -1)


class Policy:
    name = "base"
    needs_mlp_cache = False  # set by policies whose after_attention returns subsets
    # Policies that run DyLLM-style layers (queries for a span, K/V for the changed rows,
    # approximate attention) set this and implement the ``approx_*`` hooks below.
    approximate = False
    # One row set per step, the same for every layer, chosen before the step from the host's
    # state only (no hook reads values the step computes): the step can be exported as one
    # graph (ONNX) and replayed as a CUDA graph.
    layer_uniform = False
    cached_softmax_stats = True  # DyLLM layers: approx attention mode 2 (see kernels/approx_attention.py)

    def begin_step(self, state: StepState) -> None:
        self.state = state

    def rows(self, layer: int, state: StepState) -> torch.Tensor | None:
        return None

    def after_attention(self, layer: int, rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_block(self, layer: int, rows: torch.Tensor, hidden: torch.Tensor) -> None:
        return None

    def layer_similarity(self, layer: int) -> torch.Tensor | None:
        """(B, L) fp32 cosine similarity of each position's attention context to the previous
        step's, as measured at this step's ``layer`` (NaN where not measured), or None when
        this policy measures none. Read by the engine when ``record_similarity`` is on."""
        return None

    def after_logits(self, positions: torch.Tensor, logits: torch.Tensor) -> None:
        """The step's logits (B, P, V) at ``positions`` (B, P), e.g. for confidence scores."""
        return None

    # --- DyLLM-style layers (used when ``approximate`` is True) -------------------------------

    def approx_layer(self, layer: int, state: StepState) -> tuple[int, int, torch.Tensor] | None:
        """(start, end, changed): run ``layer`` approximately, querying rows [start, end), with
        K/V recomputed for ``changed`` (B, A) (A may be 0); None: run it as a normal layer."""
        return None

    def approx_salient(self, layer: int, cos: torch.Tensor, start: int) -> torch.Tensor:
        """Rows (B, S) (absolute positions, S may be 0) that get the MLP at ``layer``, from the
        cosine similarity (B, end - start) of each queried row's new context to its cached one."""
        raise NotImplementedError
