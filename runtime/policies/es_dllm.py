"""``es_dllm``: early skipping of unimportant rows (ES-dLLM, arXiv 2603.10088; official code
zhuzj19/ES-dLLM).

At a warm step every row of the scope runs the first layers. At each *skip layer* s the
rows still running are scored

    importance = alpha * confidence (previous iteration) + (1 - alpha) * variation

where variation is the mean absolute change since the previous iteration of the row's key,
value, query or hidden state at that layer (``variation``; queries are recomputed from the
layer's input, one extra Q projection of the scored rows), divided by its largest value among the
scored rows (so it lies in [0, 1]); confidence is the sampler's top probability at the
position in the previous step (0 where no logits were computed). The top ``keep`` rows (a
fraction of the scope, or a count) go on; the ``keep_confident`` most confident masked rows
always do. The others skip every later layer and reuse their cached states.

The whole sequence is recomputed at the first step of each block and every
``refresh_interval`` steps. ``keep=1.0`` at every skip layer keeps all rows: with
``scope="all"`` that is the vanilla forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dyllm_fx.kernels.ops import gather_rows

from .base import Policy, StepState, check_scope
from .refresh import RefreshClock

VARIATIONS = ("key", "value", "query", "hidden")


def importance(confidence: torch.Tensor, variation: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * confidence + (1 - alpha) * variation / max(variation) per batch element."""
    top = variation.amax(1, keepdim=True)
    norm = torch.where(top > 0, variation / torch.where(top > 0, top, 1.0), torch.zeros_like(variation))
    return alpha * confidence + (1 - alpha) * norm


def keep_top(rows: torch.Tensor, score: torch.Tensor, k: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k`` rows (B, k) of ``rows`` with the highest score, rows flagged ``forced`` first;
    returned in ascending position order."""
    k = min(k, rows.shape[1])
    if forced is not None:
        score = torch.where(forced, torch.full_like(score, math.inf), score)
    top = score.topk(k, dim=1).indices
    return rows.gather(1, top).sort(dim=1).values


class ESDLLMPolicy(Policy):
    name = "es_dllm"

    def __init__(
        self,
        skip_layers: Sequence[int] = (1, 3),
        keep: Sequence[float] | float = (0.5, 0.25),
        alpha: float = 0.5,
        variation: str = "value",
        keep_confident: int = 2,
        refresh_interval: int = 16,
        scope: str = "response",
    ):
        skip_layers = tuple(int(s) for s in skip_layers)
        keep = (keep,) * len(skip_layers) if isinstance(keep, (int, float)) else tuple(keep)
        if not skip_layers or list(skip_layers) != sorted(set(skip_layers)) or skip_layers[0] < 0:
            raise ValueError(f"skip_layers must be increasing layer indices >= 0; got {skip_layers}")
        if len(keep) != len(skip_layers):
            raise ValueError(f"keep needs one value per skip layer ({len(skip_layers)}); got {keep}")
        if any(k <= 0 for k in keep):
            raise ValueError(f"keep values must be > 0 (a fraction of the scope, or a row count); got {keep}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1]; got {alpha}")
        if variation not in VARIATIONS:
            raise ValueError(f"variation must be one of {VARIATIONS}; got {variation!r}")
        self.skip_layers, self.keep, self.alpha = skip_layers, keep, float(alpha)
        self.variation, self.keep_confident, self.scope = variation, int(keep_confident), check_scope(scope)
        self.clock = RefreshClock(refresh_interval)
        self._snapshot: dict[int, torch.Tensor] = {}
        self._confidence: torch.Tensor | None = None

    def begin_step(self, state: StepState) -> None:
        super().begin_step(state)
        if self.skip_layers[-1] >= len(state.cache.k):
            n = len(state.cache.k)
            raise ValueError(
                f"skip layer {self.skip_layers[-1]} does not exist: the model has {n} layers; "
                f"pass skip_layers with indices below {n}, e.g. skip_layers=({max(n // 4, 0)},)"
            )
        stale = self._confidence is None or self._confidence.shape != state.input_ids.shape
        if stale:
            self._snapshot = {}
            self._confidence = torch.zeros(state.input_ids.shape, device=state.input_ids.device)
        self.refresh = self.clock.tick(state, force=stale)
        self._rows = state.span_rows(*state.span(self.scope))

    def rows(self, layer: int, state: StepState) -> torch.Tensor | None:
        if self.refresh:
            return None
        # Layers up to the first skip layer run the whole scope; later ones the rows kept so far.
        return self._rows if layer <= self.skip_layers[0] else self._live

    def _kept(self, index: int, n_scope: int) -> int:
        keep = self.keep[index]
        return max(1, math.ceil(keep * n_scope)) if keep <= 1 else int(keep)

    def _tracked(self, layer: int, rows: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The variation tensor of ``rows`` at ``layer`` as (B, A, features)."""
        if self.variation == "hidden":
            return hidden
        if self.variation == "query":  # recomputed from the layer's input (queries are not cached)
            return self.state.q_probe(layer, rows).transpose(1, 2).flatten(2)
        cache = self.state.cache.k[layer] if self.variation == "key" else self.state.cache.v[layer]
        t = gather_rows(cache, rows, 2)  # (B, KV, A, d), just written by the layer
        return t.transpose(1, 2).flatten(2)

    def after_block(self, layer: int, rows: torch.Tensor, hidden: torch.Tensor) -> None:
        if layer not in self.skip_layers:
            return
        new = self._tracked(layer, rows, hidden).float()
        old = self._snapshot.get(layer)
        if old is None:
            old = self._snapshot[layer] = torch.zeros(rows.shape[0], self.state.seq_len, new.shape[-1], device=new.device)
        # Padded row sets repeat their last row: read the old values before writing any back.
        change = (new - gather_rows(old, rows, 1)).abs().mean(-1)
        old.scatter_(1, rows[..., None].expand_as(new), new)
        if self.refresh:
            return
        n_rows = self._rows.shape[1]
        live = self._rows if layer == self.skip_layers[0] else self._live
        width = live.shape[1]
        change = change[:, :width]  # drop the bucket padding
        conf = self._confidence.gather(1, live)
        score = importance(conf, change, self.alpha)
        forced = None
        if self.keep_confident and self.state.mask_token_id is not None:
            masked = self.state.input_ids.gather(1, live) == self.state.mask_token_id
            masked_conf = torch.where(masked, conf, -1.0)
            top = masked_conf.topk(min(self.keep_confident, width), dim=1)
            forced = torch.zeros_like(masked).scatter_(1, top.indices, top.values >= 0)
        self._live = keep_top(live, score, self._kept(self.skip_layers.index(layer), n_rows), forced)

    def after_logits(self, positions: torch.Tensor, logits: torch.Tensor) -> None:
        conf = torch.softmax(logits.float(), dim=-1).amax(-1)
        self._confidence.zero_().scatter_(1, positions, conf)

