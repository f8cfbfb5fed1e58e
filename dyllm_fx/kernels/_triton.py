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
