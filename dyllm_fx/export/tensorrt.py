"""``to_tensorrt``: compile a transformed model's sparse step with torch_tensorrt (CUDA only).

The step is the same layer-uniform, functional step the ONNX export writes
(``step_module.ExportableStep``), with the custom ops replaced by aten math
(``aten_lowering``) so that TensorRT builds the whole step as one engine, no PyTorch
fallback. It is exported with ``torch.export`` (dynamic batch, sequence, active rows and logit
positions, bounded by ``max_batch`` / ``max_seq``) and compiled by
``torch_tensorrt.dynamo.compile``.

Without torch_tensorrt, the ONNX file from ``to_onnx`` is a second route to TensorRT: its
graph has standard ops only, so ``trtexec --onnx=step.onnx`` (or TensorRT's ONNX parser)
builds an engine from it.
"""

from __future__ import annotations

import torch

from dyllm_fx.runtime.policies import Policy

from .driver import ExportedStepModel, TorchBackend, build_policy
from .metadata import step_graph_info
from .onnx_export import check_exportable
from .step_module import ExportableStep, ExportError, dynamic_shapes, example_inputs

INSTALL = 'pip install "dyllm-fx[tensorrt]" (torch_tensorrt, matching your torch and CUDA versions; needs a CUDA GPU)'


class TensorRTUnavailable(RuntimeError):
    """torch_tensorrt or a CUDA GPU is missing; the message says how to install it."""


def require_tensorrt():
    """The ``torch_tensorrt`` module, or :class:`TensorRTUnavailable` naming the install."""
    try:
        import torch_tensorrt
    except ImportError as err:
        raise TensorRTUnavailable(f"to_tensorrt needs torch_tensorrt, which is not installed: {INSTALL}") from err
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(f"to_tensorrt needs a CUDA GPU and torch with CUDA; none is available here. {INSTALL}")
    return torch_tensorrt


class TensorRTStepModel(ExportedStepModel):
    """A TensorRT-compiled step; pass it to ``dyllm_fx.generate`` with the model's tokenizer.

    ``compiled`` is the torch_tensorrt module (signature of ``ExportableStep``), ``info`` the
    same metadata an ONNX export records.
    """

    def __init__(self, compiled, info, policy: Policy, device: torch.device):
        super().__init__(TorchBackend(compiled, device), info, policy)

    @property
    def compiled(self):
        return self.backend.step


def _trt_inputs(torch_tensorrt, example: tuple[torch.Tensor, ...], max_batch: int, max_seq: int, opt_seq: int,
                opt_rows: int):
    """min / opt / max shapes per input (opt: batch 1, ``opt_seq`` tokens, ``opt_rows`` rows)."""
    specs = []
    for i, t in enumerate(example):
        if i < 3 or i == 5:  # (B, L, ...) token tensors and the hidden cache
            dims = [(1, 1, max_batch), (2, opt_seq, max_seq)]
        elif i in (3, 4):  # rows, logit positions
            dims = [(1, 1, max_batch), (1, opt_rows, max_seq)]
        else:  # K / V caches (B, KV, L, d)
            dims = [(1, 1, max_batch), None, (2, opt_seq, max_seq)]
        lo, opt, hi = [], [], []
        for axis, size in enumerate(t.shape):
            spec = dims[axis] if axis < len(dims) else None
            lo.append(spec[0] if spec else size)
            opt.append(spec[1] if spec else size)
            hi.append(spec[2] if spec else size)
        specs.append(torch_tensorrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=t.dtype))
    return specs


def to_tensorrt(
    model,
    *,
    max_batch: int = 8,
    max_seq: int | None = None,
    opt_seq: int | None = None,
    opt_rows: int = 32,
    model_path=None,
    **compile_options,
) -> TensorRTStepModel:
    """Compile ``model``'s sparse step with torch_tensorrt.

    Args:
        model: a :class:`~dyllm_fx.TransformedModel` on a CUDA device, with a layer-uniform
            policy (as for :func:`~dyllm_fx.export.to_onnx`).
        max_batch, max_seq: upper bounds of the engine's dynamic batch and sequence length
            (``max_seq`` defaults to the model's window).
        opt_seq, opt_rows: the shapes TensorRT tunes for (default ``max_seq`` tokens, 32 rows:
            one Fast-dLLM block).
        model_path: recorded in ``info`` like ``to_onnx`` does.
        **compile_options: passed to ``torch_tensorrt.dynamo.compile`` (e.g.
            ``enabled_precisions={torch.float16}``).

    Returns:
        :class:`TensorRTStepModel`, usable with ``dyllm_fx.generate``.

    Raises:
        TensorRTUnavailable: torch_tensorrt or CUDA is missing (the message says how to install).
    """
    check_exportable(model)
    torch_tensorrt = require_tensorrt()
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ExportError("the model is on the CPU; load it on the GPU first: dyllm_fx.load(path, device='cuda')")
    max_seq = max_seq or model.diffusion.max_length or 4096
    if max_batch < 2 or max_seq < 24:
        raise ValueError(f"max_batch={max_batch} and max_seq={max_seq} must be at least 2 and 24 (the traced example)")
    opt_seq = min(opt_seq or max_seq, max_seq)
    info = step_graph_info(model, model_path)
    step = ExportableStep(model.program, lower_ops=True).eval()
    example = example_inputs(model.program, device)
    with torch.no_grad():
        exported = torch.export.export(step, example, dynamic_shapes=dynamic_shapes(step.n_layers, max_batch, max_seq))
        compiled = torch_tensorrt.dynamo.compile(
            exported,
            arg_inputs=_trt_inputs(torch_tensorrt, example, max_batch, max_seq, opt_seq, min(opt_rows, max_seq)),
            **compile_options,
        )
    return TensorRTStepModel(compiled, info, build_policy(info, model.policy), device)


__all__ = ["INSTALL", "TensorRTStepModel", "TensorRTUnavailable", "require_tensorrt", "to_tensorrt"]
