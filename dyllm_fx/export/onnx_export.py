"""``to_onnx``: a transformed model's sparse step as one ONNX graph of standard ops."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .metadata import step_graph_info
from .step_module import ExportableStep, ExportError, check_layer_uniform, dynamic_shapes, example_inputs

MIN_OPSET = 18  # the translations in lowering.py are written against opset 18
ONNX_EXTRA = 'pip install "dyllm-fx[onnx]" (onnx, onnxscript and onnxruntime)'


def require_onnx_export() -> None:
    """Raise ImportError naming the install command when the exporter's packages are missing."""
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError as err:
            raise ImportError(f"exporting to ONNX needs the {module!r} package: {ONNX_EXTRA}") from err


def check_exportable(model) -> None:
    """A TransformedModel with a diffusion spec and a layer-uniform policy, else a clear error."""
    from dyllm_fx.transform import TransformedModel

    if not isinstance(model, TransformedModel):
        raise ExportError(
            f"expected a TransformedModel, got {type(model).__name__}; call "
            "dyllm_fx.transform(model, policy='dense' | 'prefix_cache' | 'dual_cache') first"
        )
    if model.diffusion is None:
        raise ExportError("the model has no diffusion spec; pass spec=DiffusionSpec(...) to dyllm_fx.transform()")
    check_layer_uniform(model.policy)


def to_onnx(
    model,
    path: str | Path,
    *,
    model_path: str | Path | None = None,
    opset: int = MIN_OPSET,
    external_data: bool | None = None,
    optimize: bool = True,
) -> Path:
    """Export one sparse denoising step of ``model`` to an ONNX file.

    The graph is :class:`~dyllm_fx.export.step_module.ExportableStep`: inputs ``input_ids``,
    ``attention_mask``, ``position_ids`` (B, L), ``rows`` (B, A), ``logit_positions`` (B, P),
    ``hidden`` (B, L, D) and ``k_cache_i`` / ``v_cache_i`` (B, KV, L, d) per layer; outputs
    ``logits`` (B, P, V) and the updated caches (``hidden_out``, ``k_cache_i_out``, ...).
    B, L, A and P are dynamic. The project's custom ops are lowered to standard ONNX ops
    (ScatterElements, MatMul, Softmax, ...), so onnxruntime and TensorRT read the file
    without plugins. The policy's name and parameters, the diffusion spec and the cache layout
    are stored in the file's metadata; :func:`~dyllm_fx.export.load_onnx` runs it.

    Args:
        model: a :class:`~dyllm_fx.TransformedModel` whose policy is layer-uniform (``dense``,
            ``fixed``, ``prefix_cache``, ``dual_cache``). Policies that choose rows per layer
            inside the step (DyLLM, ES-dLLM) cannot be exported and raise ``ExportError``.
        path: the ``.onnx`` file to write.
        model_path: the model folder (or ``"default"``) whose tokenizer decodes the output;
            recorded so ``dyllm generate --onnx`` needs nothing else.
        opset: ONNX opset, at least 18.
        external_data: store the weights in a side file (``path.data``); default: only when
            the model exceeds protobuf's 2 GB limit.
        optimize: run onnxscript's graph optimizer (constant folding, dead code removal).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    check_exportable(model)
    if opset < MIN_OPSET:
        raise ValueError(f"opset={opset} is too old: the step graph needs opset >= {MIN_OPSET}")
    require_onnx_export()
    from .lowering import translation_table

    info = step_graph_info(model, model_path)
    step = ExportableStep(model.program).eval()
    device = next(model.parameters()).device
    args = example_inputs(model.program, device)
    with torch.no_grad(), warnings.catch_warnings():
        # The exporter warns that tied dims share one name ("batch" for every batch axis): expected.
        warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
        program = torch.onnx.export(
            step, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes(step.n_layers),
            input_names=info.inputs, output_names=info.outputs, custom_translation_table=translation_table(),
            optimize=optimize, verbose=False,
        )
    program.model.metadata_props.update(info.to_props())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=external_data)
    return path


__all__ = ["MIN_OPSET", "check_exportable", "require_onnx_export", "to_onnx"]
