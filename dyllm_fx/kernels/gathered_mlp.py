"""Gathered MLP / projections on the active rows: plain torch, no Triton kernel (a decision).

    out[b, rows[b, a]] = f(h[b, rows[b, a]])         (index_select -> dense GEMMs -> index_copy)

The sparse step runs the MLP and the Q/K/V/O projections on the active rows only. A fused
Triton kernel could gather the rows inside the GEMM's A-operand load and scatter the result in
its epilogue, saving one read and one write of the (A, D) activations. We keep the torch path:

* the GEMMs dominate (A x D x 4D multiply-adds per projection against A x D of gather/scatter
  traffic), and they run on cuBLAS / the compiler's tuned templates; a hand-written Triton GEMM
  must first match cuBLAS at every bucket size before the saved copies can pay;
* torch.compile (Inductor) already fuses the gather into the producer/consumer elementwise
  kernels around the matmuls, which removes most of the extra traffic for free;
* a kernel that has not been timed against cuBLAS on a GPU does not belong on the hot path.

Revisit with measurements on a GPU (per bucket size A and model width D): gather + matmul +
scatter here versus a fused gather-GEMM-scatter (e.g. Triton's grouped-GEMM tutorial pattern).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gathered_rows_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    rows: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply a row-wise ``fn`` (an MLP, a projection) to the rows ``rows`` (B, A) of ``h``
    (B, L, D) and write the results into ``out`` (B, L, D') at those rows (in place; a new
    zero tensor when ``out`` is None). Returns ``out``."""
    bsz, n_rows = rows.shape
    flat = (rows + torch.arange(bsz, device=rows.device)[:, None] * h.shape[1]).reshape(-1)
    y = fn(h.reshape(-1, h.shape[-1]).index_select(0, flat).view(bsz, n_rows, -1))
    if out is None:
        out = h.new_zeros(h.shape[:-1] + y.shape[-1:], dtype=y.dtype)
    out.view(-1, out.shape[-1]).index_copy_(0, flat, y.reshape(-1, y.shape[-1]))
    return out
