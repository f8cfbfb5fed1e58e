"""The functional twin of ``dyllm::cache_write_rows``, used only in exported graphs.

``dyllm::cache_write_rows`` writes rows into a cache in place and returns nothing. ONNX (and
TensorRT) graphs have no in-place writes: a write has to produce a new tensor that the graph
returns. The export rewrites each in-place write into this op, which returns the updated
cache, and ``lowering.py`` translates it to ``ScatterElements``.
"""

from __future__ import annotations

import torch

from dyllm_fx.kernels.cache_scatter import cache_write_rows_reference


@torch.library.custom_op("dyllm_export::cache_write_rows", mutates_args=())
def cache_write_rows(cache: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, dim: int) -> torch.Tensor:
    """A copy of ``cache`` with ``cache[b, ..., rows[b, a], ...] = values[b, ..., a, ...]`` along ``dim``."""
    out = cache.clone()
    cache_write_rows_reference(out, rows, values, dim)
    return out


@cache_write_rows.register_fake
def _(cache, rows, values, dim):
    return torch.empty_like(cache)


__all__ = ["cache_write_rows"]
