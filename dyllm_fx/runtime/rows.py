"""Row sets with shapes fixed for a step: spans, padded row lists and top-C selections.

Every row set is a pair of (B, W) tensors: ``rows``, absolute sequence positions, and
``valid``, which of them really belong to the set. W is a Python int chosen on the host before
the step (a *capacity* or a bucketed width), so the step's shapes never depend on values it
computes. Two conventions keep the padding harmless:

* a padded *span* repeats its last row: the padding computes exactly what that row computes, so
  its writes are idempotent and nothing needs masking (``span_rows``);
* a *selection* (``select_top``) holds C distinct rows; the ones that are not valid are
  computed but their writes are suppressed (``write_rows`` with ``valid``).
"""

from __future__ import annotations

import torch

from dyllm_fx.kernels.cache_scatter import cache_write_rows_reference


def bucket_size(n: int, limit: int, minimum: int = 8) -> int:
    """The next power of two >= n (at least ``minimum``), capped at ``limit``."""
    size = minimum
    while size < n:
        size *= 2
    return max(1, min(size, limit))


def span_rows(start: torch.Tensor, length: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [start[b], start[b] + length[b]) of each batch element as (rows, valid) of shape
    (B, width); slots past a span's end repeat its last row. ``length`` must be >= 1 and
    <= ``width``."""
    offsets = torch.arange(width, device=start.device)
    valid = offsets < length[:, None]
    rows = start[:, None] + torch.minimum(offsets, length[:, None] - 1)
    return rows, valid


def select_top(key: torch.Tensor, eligible: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``capacity`` slots of largest ``key`` among the ``eligible`` ones, as (slots, valid)
    (B, C) with slots in ascending order; ties are broken by position (a stable sort), so eager
    and compiled steps choose the same rows. Where fewer than C are eligible the remaining slots
    are other, distinct slots marked not valid."""
    capacity = min(capacity, key.shape[1])
    masked = torch.where(eligible, key.float(), float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :capacity]
    slots = order.sort(dim=1).values
    return slots, eligible.gather(1, slots)


def take(x: torch.Tensor, slots: torch.Tensor, dim: int) -> torch.Tensor:
    """x[b, ..., slots[b, c], ...] along ``dim`` (a gather with the index broadcast over the
    other dimensions)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = slots.shape
    target = list(x.shape)
    target[0], target[dim] = slots.shape
    return x.gather(dim, slots.view(shape).expand(target))


def write_rows(
    dest: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, dim: int, valid: torch.Tensor | None = None
):
    """dest[b, ..., rows[b, a], ...] = values[b, ..., a, ...] along ``dim``, in place; with
    ``valid`` (B, A) the entries that are not valid keep dest's old value (``rows`` must then
    be distinct per batch element, as a :func:`select_top` selection is)."""
    if valid is not None:
        shape = [1] * values.dim()
        shape[0], shape[dim] = valid.shape
        values = torch.where(valid.view(shape), values, take(dest, rows, dim))
    cache_write_rows_reference(dest, rows, values, dim)
    return dest


def count_rows(valid: torch.Tensor) -> torch.Tensor:
    """The largest number of valid entries of any batch element, as a 0-d int64 tensor."""
    return valid.sum(1).amax() if valid.numel() else valid.new_zeros((), dtype=torch.int64)


def mark(
    activity: torch.Tensor | None,
    layer: int,
    rows: torch.Tensor,
    level: float,
    valid: torch.Tensor | None = None,
):
    """Trace what ``layer`` did to ``rows`` into ``activity`` (n_layers, B, L) when tracing is on
    (``activity`` None: off): ``level`` 1 recomputed, 0.5 attention only; the largest level a
    row got this step is kept."""
    if activity is None:
        return
    values = torch.full(rows.shape, level, dtype=activity.dtype, device=rows.device)
    if valid is not None:
        values = values * valid
    activity[layer].scatter_reduce_(1, rows, values, "amax")
