"""``dllm_cache``: dLLM-Cache (Liu et al., 2025): prompt and response cached at different
intervals, with the response rows whose values moved most refreshed adaptively.

* every ``prompt_interval`` steps (and at a cold cache) the whole sequence is recomputed;
* every ``response_interval`` steps the response is recomputed (the prompt stays cached);
* at the other steps each layer first projects V for every response row from its current
  input (``kv_probe``, the cheap check the method is built on), and recomputes the
  ``ratio`` fraction of rows whose V has the lowest cosine similarity to the cached V;
  the other rows reuse their cached attention and MLP results.

``ratio=1.0`` recomputes the whole response at every step; with ``scope="all"`` that is
the vanilla forward.
"""

from __future__ import annotations

import math

import torch

from dyllm_fx.kernels.ops import gather_rows

from .base import Policy, StepState, check_scope
from .refresh import RefreshClock


def value_similarity(v_new: torch.Tensor, v_cached: torch.Tensor) -> torch.Tensor:
    """Per row cosine similarity over all heads: (B, KV, A, d) x2 -> (B, A), fp32."""
    a, b = v_new.float().transpose(1, 2).flatten(2), v_cached.float().transpose(1, 2).flatten(2)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)


class DLLMCachePolicy(Policy):
    name = "dllm_cache"

    def __init__(
        self, prompt_interval: int = 32, response_interval: int = 8, ratio: float = 0.25, scope: str = "response"
    ):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio (the fraction of response rows refreshed per step) must lie in (0, 1]; got {ratio}")
        self.prompt_clock = RefreshClock(prompt_interval, on_new_block=False, name="prompt_interval")
        self.response_clock = RefreshClock(response_interval, on_new_block=False, name="response_interval")
        self.ratio = float(ratio)
        self.scope = check_scope(scope)
        self._shape: tuple | None = None

    def begin_step(self, state: StepState) -> None:
        super().begin_step(state)
        stale = self._shape != tuple(state.input_ids.shape)
        self._shape = tuple(state.input_ids.shape)
        self.full = self.prompt_clock.tick(state, force=stale)
        self.whole_response = self.response_clock.tick(state, force=self.full) or self.ratio >= 1.0
        self._span = state.span_rows(*state.span(self.scope))

    def rows(self, layer: int, state: StepState) -> torch.Tensor | None:
        if self.full:
            return None
        if self.whole_response:
            return self._span
        _, v_new = state.kv_probe(layer, self._span)
        sim = value_similarity(v_new, gather_rows(state.cache.v[layer], self._span, 2))
        k = max(1, math.ceil(self.ratio * self._span.shape[1]))
        picked = (-sim).topk(k, dim=1).indices
        return self._span.gather(1, picked).sort(dim=1).values
