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

from .driver import (
    ExportedStepModel,
    PlanStepModel,
    TorchBackend,
    TorchPlanBackend,
    build_policy,
    plan_policy,
)
from .metadata import step_graph_info
from .onnx_export import check_exportable
from .plan_keys import Layout
from .step_module import ExportableStep, ExportError, dynamic_shapes, example_inputs, is_layer_uniform

INSTALL = (
    'pip install "dyllm-fx[tensorrt]" (torch_tensorrt, matching your torch and CUDA versions; '
    "needs a CUDA GPU)"
)


class TensorRTUnavailable(RuntimeError):
    """torch_tensorrt or a CUDA GPU is missing; the message says how to install it."""


def require_tensorrt():
    """The ``torch_tensorrt`` module, or :class:`TensorRTUnavailable` naming the install."""
    try:
        import torch_tensorrt
    except ImportError as err:
        raise TensorRTUnavailable(
            f"to_tensorrt needs torch_tensorrt, which is not installed: {INSTALL}"
        ) from err
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            f"to_tensorrt needs a CUDA GPU and torch with CUDA; none is available here. {INSTALL}"
        )
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


def _trt_inputs(
    torch_tensorrt,
    example: tuple[torch.Tensor, ...],
    max_batch: int,
    max_seq: int,
    opt_seq: int,
    opt_rows: int,
):
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


def export_plan_programs(build, max_batch: int = 4096) -> list:
    """One ``torch.export`` program per branch of ``build`` (``plans.build_plan_step``; built
    with ``by_shape=False``, one per plan key): the aten graphs ``to_tensorrt`` compiles (batch
    and sequence dynamic, plain-torch ops)."""
    from .policy_step import dynamic_shapes as plan_dims

    step = build.step
    programs = []
    with build.tracing():
        for i, branch in enumerate(build.branches):
            step.key = branch.key
            dims = plan_dims(
                step.layout, len(step.params), step.n_sizes, branch.min_seq, branch.max_seq, max_batch
            )
            programs.append(torch.export.export(step, build.example(i), dynamic_shapes=dims, strict=False))
    return programs


def _plan_trt_inputs(torch_tensorrt, build, i: int, max_batch: int, opt_seq: int):
    """min / opt / max shapes of branch ``i``'s inputs (a build with one branch per key, so no
    size inputs): batch 1..max_batch (opt 1), the key's sequence range (opt ``opt_seq`` within
    it), logit positions 1..max_seq (opt one block)."""
    branch, example = build.branches[i], build.example(i)
    seq = (branch.min_seq, min(max(opt_seq, branch.min_seq), branch.max_seq), branch.max_seq)
    positions = (1, build.layout.block, branch.max_seq)
    step = build.step
    axes = [{0: "batch", 1: "seq"}] * 3 + [{0: "batch", 1: "positions"}, {0: "batch"}, {0: "batch"}]
    axes += [{}] * len(step.params)
    axes += [{a: d for a, d in enumerate(e.shape) if isinstance(d, str)} for e in step.layout.entries]
    ranges = {"batch": (1, 1, max_batch), "seq": seq, "positions": positions}
    specs = []
    for t, named in zip(example, axes):
        lo, opt, hi = (
            [ranges[named[a]][j] if a in named else s for a, s in enumerate(t.shape)] for j in range(3)
        )
        specs.append(torch_tensorrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=t.dtype))
    return specs


class TensorRTPlanModel(PlanStepModel):
    """A row policy's step compiled by TensorRT, one engine per plan key; pass it to
    ``dyllm_fx.generate``. ``compiled`` lists the engines in ``info.branches`` order (one
    branch per key)."""

    def __init__(self, compiled: list, info, policy: Policy, device: torch.device):
        super().__init__(TorchPlanBackend(compiled, device), info, policy)

    @property
    def compiled(self) -> list:
        return self.backend.steps


def to_tensorrt(
    model,
    *,
    max_batch: int = 8,
    max_seq: int | None = None,
    opt_seq: int | None = None,
    opt_rows: int = 32,
    model_path=None,
    gen_length: int = 64,
    block_length: int | None = 32,
    steps: int | None = None,
    threshold: bool = False,
    max_commit: int | None = None,
    keys=None,
    **compile_options,
) -> "TensorRTStepModel | TensorRTPlanModel":
    """Compile ``model``'s sparse step with torch_tensorrt.

    Args:
        model: a :class:`~dyllm_fx.TransformedModel` on a CUDA device, with any policy
            :func:`~dyllm_fx.export.to_onnx` exports. A layer-uniform policy compiles to one
            engine (rows from the host); a row policy (DyLLM, ES-dLLM, dLLM-Cache and their
            compositions) to one engine per plan key of the layout, each its own step with the
            gating inside (the ONNX export groups keys that differ only in their sizes; a
            ``torch.export`` program cannot, see ``_plan_engines``).
        max_batch, max_seq: upper bounds of the engine's dynamic batch and sequence length
            (``max_seq`` defaults to the model's window).
        opt_seq, opt_rows: the shapes TensorRT tunes for (default ``max_seq`` tokens, 32 rows:
            one Fast-dLLM block; row policies tune for batch 1 and one block of logits).
        model_path: recorded in ``info`` like ``to_onnx`` does.
        gen_length, block_length, steps, threshold, max_commit, keys: a row policy's layout
            and plan keys, as for ``to_onnx``.
        **compile_options: passed to ``torch_tensorrt.dynamo.compile`` (e.g.
            ``enabled_precisions={torch.float16}``).

    Returns:
        :class:`TensorRTStepModel` or :class:`TensorRTPlanModel`, usable with ``dyllm_fx.generate``.

    Raises:
        TensorRTUnavailable: torch_tensorrt or CUDA is missing (the message says how to install).
    """
    check_exportable(model)
    torch_tensorrt = require_tensorrt()
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ExportError(
            "the model is on the CPU; load it on the GPU first: dyllm_fx.load(path, device='cuda')"
        )
    if not is_layer_uniform(model.policy):
        return _plan_engines(
            torch_tensorrt,
            model,
            device,
            max_batch,
            max_seq,
            opt_seq,
            model_path,
            compile_options,
            Layout(gen_length, block_length, steps, threshold, max_seq, max_commit),
            keys,
        )
    max_seq = max_seq or model.diffusion.max_length or 4096
    if max_batch < 2 or max_seq < 24:
        raise ValueError(
            f"max_batch={max_batch} and max_seq={max_seq} must be at least 2 and 24 (the traced example)"
        )
    opt_seq = min(opt_seq or max_seq, max_seq)
    info = step_graph_info(model, model_path)
    step = ExportableStep(model.program, lower_ops=True).eval()
    example = example_inputs(model.program, device)
    with torch.no_grad():
        exported = torch.export.export(
            step, example, dynamic_shapes=dynamic_shapes(step.n_layers, max_batch, max_seq)
        )
        compiled = torch_tensorrt.dynamo.compile(
            exported,
            arg_inputs=_trt_inputs(
                torch_tensorrt, example, max_batch, max_seq, opt_seq, min(opt_rows, max_seq)
            ),
            **compile_options,
        )
    return TensorRTStepModel(compiled, info, build_policy(info, model.policy), device)


def _plan_engines(
    torch_tensorrt, model, device, max_batch, max_seq, opt_seq, model_path, compile_options, layout, keys
):
    from .plans import build_plan_step

    # one engine per key: a torch.export program keeps the runtime asserts its trace recorded
    # about the sizes (a capacity below its span), so a program traced with sizes as inputs
    # refuses a capacity equal to the span
    build = build_plan_step(model, layout, keys, by_shape=False)
    opt_seq = opt_seq or build.layout.max_seq
    engines = []
    for i, program in enumerate(export_plan_programs(build, max_batch)):
        with build.tracing():
            engines.append(
                torch_tensorrt.dynamo.compile(
                    program,
                    arg_inputs=_plan_trt_inputs(torch_tensorrt, build, i, max_batch, opt_seq),
                    **compile_options,
                )
            )
    info = build.graph_info(model, model_path)
    return TensorRTPlanModel(engines, info, plan_policy(info, None), device)


__all__ = [
    "INSTALL",
    "TensorRTPlanModel",
    "TensorRTStepModel",
    "TensorRTUnavailable",
    "export_plan_programs",
    "require_tensorrt",
    "to_tensorrt",
]
