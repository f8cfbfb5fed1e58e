"""``dense``: every row active in every layer; the transformed model equals the original."""

from __future__ import annotations

from .uniform import UniformPolicy


class DensePolicy(UniformPolicy):
    name = "dense"
