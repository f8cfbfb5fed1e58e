"""``dense``: every row active in every layer; the transformed model equals the original."""

from __future__ import annotations

from .base import Policy


class DensePolicy(Policy):
    layer_uniform = True
    name = "dense"
