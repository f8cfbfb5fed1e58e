"""Row sets: (B, A) int64 positions per batch element, and how they are padded to buckets.

Row counts are padded to buckets (powers of two, capped at the sequence length) by repeating a
row of the same set, so compiled pieces see a handful of shapes; a repeated row computes and
writes the same values twice, which every op allows.
"""

from __future__ import annotations

import torch


def bucket_size(n: int, seq_len: int, minimum: int = 8) -> int:
    """Next power of two >= n (at least ``minimum``), capped at ``seq_len``."""
    size = minimum
    while size < n:
        size *= 2
    return min(size, seq_len)


def pad_rows(rows: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Pad (B, A) row indices to a bucket width by repeating each row's last index."""
    width = bucket_size(rows.shape[1], seq_len)
    if width == rows.shape[1]:
        return rows
    return torch.cat([rows, rows[:, -1:].expand(-1, width - rows.shape[1])], dim=1)


def pad_row_set(rows: torch.Tensor, fill: int, seq_len: int) -> torch.Tensor:
    """``pad_rows`` for sets with -1 holes (ragged per element, possibly empty): every hole
    becomes a real row of its element (its largest), or ``fill`` when the element has none."""
    if rows.shape[1] == 0:
        rows = rows.new_full((rows.shape[0], 1), -1)
    valid = rows >= 0
    last = torch.where(valid, rows, -1).amax(1, keepdim=True)
    return pad_rows(torch.where(valid, rows, torch.where(last >= 0, last, fill)), seq_len)


def rows_where(flag: torch.Tensor, offset: int) -> torch.Tensor:
    """(B, N) bool -> (B, max count) absolute positions (offset + column), -1 padded."""
    count = int(flag.sum(1).max()) if flag.numel() else 0
    cols = torch.arange(flag.shape[1], device=flag.device).expand_as(flag)
    big = flag.shape[1]
    idx = torch.where(flag, cols, big).sort(dim=1).values[:, :count]
    return torch.where(idx < big, idx + offset, -1)


def flat_row_set(rows: torch.Tensor, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, A) row set with -1 holes as two flat (T,) vectors (batch index, position) of its
    valid entries in batch order, padded to a bucket (capped at ``max_rows``) by repeating the
    last entry; both empty when there is none. Costs one host sync (the count)."""
    batch, slot = (rows >= 0).nonzero(as_tuple=True)
    if batch.numel() == 0:
        return batch, batch
    batch, pos = pad_rows(torch.stack([batch, rows[batch, slot]]), max_rows)
    return batch, pos
