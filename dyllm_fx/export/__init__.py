"""Export a transformed model's sparse denoising step: ONNX (run with onnxruntime) and TensorRT.

    fast = dyllm_fx.transform(model, policy="dual_cache")
    dyllm_fx.export.to_onnx(fast, "step.onnx", model_path="default")
    onnx_model = dyllm_fx.export.load_onnx("step.onnx")
    out = dyllm_fx.generate(onnx_model, onnx_model.tokenizer, ["shift:abc="])

    trt_model = dyllm_fx.export.to_tensorrt(fast)          # CUDA + torch_tensorrt

The exported step is *layer-uniform*: one row set per step, chosen on the host by the policy,
recomputed by every layer (``dense``, ``fixed``, ``prefix_cache``, ``dual_cache``). Policies
that choose rows per layer inside the step (DyLLM, ES-dLLM) are not exportable and raise
:class:`ExportError`. See ``step_module.py`` for the graph's inputs and outputs.

Modules: ``step_module`` (the functional step), ``ops`` (the functional cache write),
``lowering`` (ONNX translations), ``aten_lowering`` (aten math for TensorRT), ``metadata``,
``onnx_export``, ``driver`` (host side of a step), ``onnx_runner``, ``tensorrt``.
"""

from .driver import ExportedStepModel, UniformStep
from .metadata import NotAStepGraphError, StepGraphInfo
from .onnx_export import to_onnx
from .onnx_runner import OnnxStepModel, load_onnx
from .step_module import ExportableStep, ExportError, is_layer_uniform
from .tensorrt import TensorRTStepModel, TensorRTUnavailable, to_tensorrt

__all__ = [
    "ExportError", "ExportableStep", "ExportedStepModel", "NotAStepGraphError", "OnnxStepModel", "StepGraphInfo",
    "TensorRTStepModel", "TensorRTUnavailable", "UniformStep", "is_layer_uniform", "load_onnx", "to_onnx", "to_tensorrt",
]
