"""Export a transformed model's sparse denoising step: ONNX (run with onnxruntime) and TensorRT.

    fast = dyllm_fx.transform(model, policy="dyllm", tau=0.99)
    dyllm_fx.export.to_onnx(fast, "step.onnx", model_path="default", gen_length=64, block_length=32)
    onnx_model = dyllm_fx.export.load_onnx("step.onnx")
    out = dyllm_fx.generate(onnx_model, onnx_model.tokenizer, ["shift:abc="])

    trt_model = dyllm_fx.export.to_tensorrt(fast)          # CUDA + torch_tensorrt

Every policy exports. A *layer-uniform* one (``dense``, ``fixed``, ``prefix_cache``,
``dual_cache``) is one graph on a row set the host picks (``step_module.ExportableStep``). A
*row* policy (``dyllm``, ``es_dllm``, ``dllm_cache``, compositions with a block cache) exports
its own step function, gating included, once per kind of step the generation layout can reach
(the policy's ``plan_keys`` grouped by all but their sizes, which are inputs), as branches of
one ONNX file (``onnx_plans``). Either kind runs
under the runtime's own step engine, the exported graph as its runner (``driver``): the same
policy object plans each step on the host and the plan's key picks the branch.

Modules: ``step_module`` (the layer-uniform step), ``ops`` (its functional cache write),
``lowering`` (ONNX translations), ``aten_lowering`` (aten math for TensorRT), ``plan_keys``,
``policy_step`` (a row policy's functional step), ``plans``, ``onnx_plans``, ``metadata``,
``onnx_export``, ``driver`` (the graphs as step-engine runners), ``onnx_runner``, ``tensorrt``,
``progress`` (output path, length warning, progress bar), ``noise`` (third-party warnings
silenced), ``workers`` (branches exported in parallel processes).
"""

from .driver import ExportedPlanMissing, ExportedStepModel, PlanGraphRunner, PlanStepModel, UniformGraphRunner
from .metadata import NotAStepGraphError, StepGraphInfo
from .onnx_export import to_onnx
from .onnx_runner import OnnxPlanModel, OnnxStepModel, load_onnx
from .plan_keys import Layout, PlanKeyError, plan_keys
from .plans import record_plan_keys
from .step_module import ExportableStep, ExportError, is_layer_uniform
from .tensorrt import TensorRTPlanModel, TensorRTStepModel, TensorRTUnavailable, to_tensorrt

__all__ = [
    "ExportError",
    "ExportableStep",
    "ExportedPlanMissing",
    "ExportedStepModel",
    "Layout",
    "NotAStepGraphError",
    "OnnxPlanModel",
    "OnnxStepModel",
    "PlanGraphRunner",
    "PlanKeyError",
    "PlanStepModel",
    "StepGraphInfo",
    "TensorRTPlanModel",
    "TensorRTStepModel",
    "TensorRTUnavailable",
    "UniformGraphRunner",
    "is_layer_uniform",
    "load_onnx",
    "plan_keys",
    "record_plan_keys",
    "to_onnx",
    "to_tensorrt",
]
