"""The custom ops' lowerings (ONNX translations and aten math) against their torch references."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dyllm_fx.export import functional_ops as export_ops  # noqa: F401  (registers dyllm_export ops)
from dyllm_fx.export.aten_lowering import attention_math, scatter_rows
from dyllm_fx.kernels.cache_scatter import cache_write_rows_reference
from dyllm_fx.kernels.partial_attention import partial_attention_reference

B, H, L, D = 2, 4, 12, 8


def _rows(active: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(L, generator=gen)[:active] for _ in range(B)])


def _mask(kind: str) -> torch.Tensor | None:
    gen = torch.Generator().manual_seed(1)
    if kind == "none":
        return None
    if kind == "key_padding":  # (B, 1, 1, L) bool, row 0 left padded
        m = torch.ones(B, 1, 1, L, dtype=torch.bool)
        m[0, ..., :3] = False
        return m
    if kind == "full_bool":  # (1, 1, L, L), never a fully masked query row
        m = torch.rand(1, 1, L, L, generator=gen) > 0.3
        m[..., 0] = True
        return m
    return torch.randn(B, 1, L, L, generator=gen)  # additive float


CASES = [(4, "key_padding", None), (2, "full_bool", None), (1, "float", 0.3), (4, "none", 0.5)]


def _attention_inputs(kv_heads: int):
    gen = torch.Generator().manual_seed(2)
    rows = _rows(5)
    q = torch.randn(B, H, rows.shape[1], D, generator=gen)
    k = torch.randn(B, kv_heads, L, D, generator=gen)
    v = torch.randn(B, kv_heads, L, D, generator=gen)
    return q, k, v, rows


@pytest.mark.parametrize("kv_heads,mask_kind,scale", CASES)
def test_aten_attention_matches_reference(kv_heads, mask_kind, scale):
    q, k, v, rows = _attention_inputs(kv_heads)
    mask = _mask(mask_kind)
    want = partial_attention_reference(q, k, v, rows, mask, scale)
    torch.testing.assert_close(attention_math(q, k, v, rows, mask, scale), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [1, 2])
def test_aten_scatter_matches_reference(dim):
    cache = torch.randn(B, L, 3, 4) if dim == 1 else torch.randn(B, 3, L, 4)
    rows = _rows(5)
    values = torch.randn(B, 5, 3, 4) if dim == 1 else torch.randn(B, 3, 5, 4)
    want = cache.clone()
    cache_write_rows_reference(want, rows, values, dim)
    assert torch.equal(scatter_rows(cache, rows, values, dim), want)
    assert torch.equal(torch.ops.dyllm_export.cache_write_rows(cache, rows, values, dim), want)


# --- ONNX translations: each op alone, exported and run with onnxruntime ----------------------

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
onnx_needed = pytest.mark.skipif(
    not HAS_ONNX, reason='needs onnx, onnxscript and onnxruntime: pip install "dyllm-fx[onnx]"'
)


def _run_onnx(module: torch.nn.Module, args: tuple, tmp_path) -> list:
    import onnxruntime as ort

    from dyllm_fx.export.lowering import translation_table

    program = torch.onnx.export(
        module.eval(),
        args,
        dynamo=True,
        opset_version=18,
        custom_translation_table=translation_table(),
        verbose=False,
    )
    path = tmp_path / "op.onnx"
    program.save(str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), [a for a in args if a is not None])}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


class _Attention(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v, rows, mask=None):
        return torch.ops.dyllm.partial_attention(q, k, v, rows, mask, self.scale)


class _Write(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, cache, rows, values):
        return torch.ops.dyllm_export.cache_write_rows(cache, rows, values, self.dim)


@pytest.mark.slow
@onnx_needed
@pytest.mark.parametrize("kv_heads,mask_kind,scale", CASES)
def test_onnx_attention_matches_reference(kv_heads, mask_kind, scale, tmp_path):
    q, k, v, rows = _attention_inputs(kv_heads)
    mask = _mask(mask_kind)
    (got,) = _run_onnx(_Attention(scale), (q, k, v, rows, mask), tmp_path)
    torch.testing.assert_close(
        got, partial_attention_reference(q, k, v, rows, mask, scale), atol=1e-5, rtol=1e-5
    )


@onnx_needed
@pytest.mark.parametrize("dim", [1, 2])
def test_onnx_cache_write_matches_reference(dim, tmp_path):
    cache = torch.randn(B, L, 3, 4) if dim == 1 else torch.randn(B, 3, L, 4)
    rows = _rows(5)
    values = torch.randn(B, 5, 3, 4) if dim == 1 else torch.randn(B, 3, 5, 4)
    want = cache.clone()
    cache_write_rows_reference(want, rows, values, dim)
    (got,) = _run_onnx(_Write(dim), (cache, rows, values), tmp_path)
    assert torch.equal(got, want)


@onnx_needed
def test_onnx_attention_half_precision(tmp_path):
    """float16 in and out, scores and softmax in float32 inside the graph."""
    q, k, v, rows = _attention_inputs(2)
    mask = _mask("key_padding")
    (got,) = _run_onnx(_Attention(None), (q.half(), k.half(), v.half(), rows, mask), tmp_path)
    assert got.dtype == torch.float16
    want = partial_attention_reference(q.half().float(), k.half().float(), v.half().float(), rows, mask, None)
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)
