"""Shared Triton plumbing: whether Triton is importable, and when its kernels may run.

Triton is optional. Without it every op runs its plain-torch reference. With it, the kernels
run on CUDA tensors (registered per device in ``kernels/dispatch.py``), and on CPU tensors only
under the Triton interpreter (``TRITON_INTERPRET=1``, read when the kernels are defined), which
the tests use to check each kernel against its reference without a GPU.
"""

from __future__ import annotations

import os

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# On CUDA the ops run their Triton kernels (checked against the references by
# tests/test_kernels.py under `pytest -m cuda`; timed by benchmarks/kernels_timing.py). DYLLM_TRITON=0 (read
# at import) keeps the torch
# references instead, e.g. to compare or to work around a Triton problem.
CUDA_KERNELS_ENABLED = os.environ.get("DYLLM_TRITON", "1") != "0"


def triton_runs_on(t) -> bool:
    """True when a Triton kernel can be launched on tensors living where ``t`` lives."""
    return HAS_TRITON and (t.is_cuda or (INTERPRET and t.device.type == "cpu"))


def require_triton(t) -> None:
    if not triton_runs_on(t):
        raise RuntimeError(
            f"Triton kernels need triton and CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
            f"got a {t.device} tensor, triton {'present' if HAS_TRITON else 'missing'}"
        )


def next_pow2(n: int, minimum: int = 16) -> int:
    """Next power of two >= n, at least ``minimum`` (tl.dot wants tiles of 16 or more)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def dot_precision(dtype) -> str:
    """fp32 inputs: exact IEEE products (as torch's matmul without TF32); 16-bit: the default."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


if HAS_TRITON:
    # Building blocks of the attention kernels (partial and approximate attention), inlined by
    # Triton into each kernel that calls them.

    @triton.jit
    def program_rows(H, GROUP, n_rows, BLOCK_M: tl.constexpr):
        """This program's place in a (blocks of BLOCK_M query rows, batch x head) grid: (batch,
        head, key/value head, the block's query row offsets, which of them are < ``n_rows``)."""
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        return b, h, (h // GROUP).to(tl.int64), offs_m, offs_m < n_rows

    @triton.jit
    def load_tile(base, rows, cols, s_row, s_col, rows_ok, cols_ok):
        """The (rows, cols) tile at ``base`` with the given strides; 0 outside the valid ones."""
        return tl.load(
            base + rows[:, None] * s_row + cols[None, :] * s_col,
            mask=rows_ok[:, None] & cols_ok[None, :],
            other=0.0,
        )

    @triton.jit
    def scaled_scores(
        q, k, bias_ptrs, bias_ok, cols_ok, scale_log2, HAS_BIAS: tl.constexpr, PREC: tl.constexpr
    ):
        """q . k^T of a tile in log2 units (``scale_log2`` = scale * log2(e)), plus the additive
        bias read at ``bias_ptrs`` (natural units), -inf in the columns that are not ``cols_ok``."""
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        if HAS_BIAS:
            s = s + tl.load(bias_ptrs, mask=bias_ok, other=0.0) * 1.4426950408889634
        return tl.where(cols_ok[None, :], s, float("-inf"))

    @triton.jit
    def running_max(m_i, s):
        """The running row max after a score tile, and the max to subtract before exp2: 0 for
        rows with no finite score yet (so exp2(-inf - 0) = 0 instead of NaN)."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        return m_new, tl.where(m_new == float("-inf"), 0.0, m_new)
