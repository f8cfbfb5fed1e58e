"""``dyllm``: DyLLM's saliency-gated layers (arXiv 2603.08026; official code scale-snu/DyLLM).

Between two denoising steps only the tokens just unmasked change, and their effect fades
through the layers. At a warm step, each layer

* queries every row of its scope (``response`` by default: the prompt is frozen until the next
  refresh), recomputes K/V only for the rows that changed in the previous layer (layer 0: the
  tokens that changed since the last step), gives those rows exact attention and every other
  row the approximate update cached context + P[:, changed] . dV (``dyllm::approx_attention``);
* marks as *salient* the rows whose new context has cosine similarity to the cached one below
  ``tau``: they get the MLP here and new K/V in the next layer; the others keep their cached
  MLP output. o_proj and the residual run for every queried row.

The whole sequence is recomputed at the first step of each block and every
``refresh_interval`` steps; composed with a block cache (``scope`` ``block`` or ``suffix``), the
interval refresh recomputes only that scope, since the rows outside it are the block cache's
to refresh (at the next block). With ``cached_softmax_stats`` (default) the approximate attention
keeps each row's softmax statistics and updates them over the changed keys only (mode 2 of
``dyllm::approx_attention``, O(N A d)); off, every approximate layer runs the full score pass
(mode 1, O(N^2 d), the exact normalizer). ``tau = 1`` marks every row of the scope salient at every layer,
layer 0's input included: with ``scope="all"`` that is exactly the vanilla forward.
"""

from __future__ import annotations

import torch

from ..rows import rows_where
from .base import Policy, StepState, check_scope
from .refresh import RefreshClock

class DyLLMPolicy(Policy):
    name = "dyllm"
    needs_mlp_cache = True
    approximate = True

    def __init__(
        self, tau: float = 0.99, refresh_interval: int = 16, scope: str = "response", cached_softmax_stats: bool = True
    ):
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must lie in (0, 1] (DyLLM uses about 0.99 to 0.995); got {tau}")
        self.tau = float(tau)
        self.cached_softmax_stats = bool(cached_softmax_stats)
        self.scope = check_scope(scope)
        self.clock = RefreshClock(refresh_interval)
        self._prev_ids: torch.Tensor | None = None
        self._real: torch.Tensor | bool = True  # (B, span) non-padding rows, set per step
        self._similarity: dict[int, torch.Tensor] = {}

    def begin_step(self, state: StepState) -> None:
        super().begin_step(state)
        stale = self._prev_ids is None or self._prev_ids.shape != state.input_ids.shape
        self.refresh = self.clock.tick(state, force=stale)
        self._span = state.span(self.scope)
        start, end = self._span
        # Left padding never becomes changed or salient (its keys are masked anyway).
        self._real = state.attention_mask[:, start:end].bool() if state.attention_mask is not None else True
        if not self.refresh:
            if self.tau >= 1.0:
                changed = torch.ones_like(state.input_ids[:, start:end], dtype=torch.bool)
            else:
                changed = state.input_ids[:, start:end] != self._prev_ids[:, start:end]
            self._changed = rows_where(changed & self._real, start)
        self._prev_ids = state.input_ids.clone()
        self._similarity = {}

    def rows(self, layer: int, state: StepState) -> torch.Tensor | None:
        """Refresh steps only (warm steps run ``approx_layer``): the whole sequence, or under a
        block cache the scope alone when the refresh is the interval's."""
        if self.refresh and not self.clock.forced and self.scope in ("block", "suffix"):
            return state.span_rows(*self._span)
        return None

    def approx_layer(self, layer: int, state: StepState):
        if self.refresh:
            return None
        if layer > 0:
            self._changed = self._salient
        return (*self._span, self._changed)

    def approx_salient(self, layer: int, cos: torch.Tensor, start: int) -> torch.Tensor:
        self._similarity[layer] = cos
        flag = torch.ones_like(cos, dtype=torch.bool) if self.tau >= 1.0 else cos < self.tau
        flag = flag & self._real
        self._salient = rows_where(flag, start)
        return self._salient

    def layer_similarity(self, layer: int) -> torch.Tensor | None:
        cos = self._similarity.get(layer)
        if cos is None:
            return None
        start, end = self._span
        full = torch.full((cos.shape[0], self.state.seq_len), float("nan"))
        full[:, start:end] = cos.float().cpu()
        return full
