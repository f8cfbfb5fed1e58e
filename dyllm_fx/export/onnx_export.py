"""``to_onnx``: a transformed model's sparse step as one ONNX graph of standard ops."""

from __future__ import annotations

from pathlib import Path

from ..values import check_output_path
from .metadata import step_graph_info
from .noise import quiet_exporters
from .progress import graph_bar, warn_length
from .step_module import (
    LAYER_UNIFORM_POLICIES,
    ExportableStep,
    ExportError,
    dynamic_shapes,
    example_inputs,
    is_layer_uniform,
)
from .workers import default_workers

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
    """A TransformedModel with a diffusion spec and an exportable policy, else a clear error."""
    from dyllm_fx.transform import TransformedModel

    if not isinstance(model, TransformedModel):
        raise ExportError(
            f"expected a TransformedModel, got {type(model).__name__}; call "
            "dyllm_fx.transform(model, policy='dyllm' | 'dual_cache' | ...) first"
        )
    if model.diffusion is None:
        raise ExportError(
            "the model has no diffusion spec; pass spec=DiffusionSpec(...) to dyllm_fx.transform()"
        )
    check_policy(model.policy)


def check_policy(policy) -> None:
    """An exportable policy: layer-uniform (one graph, host rows) or a row policy whose plan keys
    ``plan_keys`` lists (one graph per branch of keys); else ExportError naming the exportable ones."""
    from .plan_keys import supports

    if is_layer_uniform(policy) or supports(policy):
        return
    uniform = ", ".join(p.name for p in LAYER_UNIFORM_POLICIES)
    raise ExportError(
        f"policy {policy.name!r} ({type(policy).__name__}) cannot be exported: an exported step is either "
        f"layer-uniform ({uniform}; a custom policy opts in with layer_uniform = True) or one of the row "
        "policies "
        "whose plan keys the exporter lists (dyllm, es_dllm, dllm_cache and their compositions with a block "
        "cache); "
        f"run {policy.name!r} with dyllm_fx.generate() on the transformed model instead"
    )


def to_onnx(
    model,
    path: str | Path,
    *,
    model_path: str | Path | None = None,
    opset: int = MIN_OPSET,
    external_data: bool | None = None,
    optimize: bool = True,
    gen_length: int = 64,
    block_length: int | None = 32,
    steps: int | None = None,
    threshold: bool = False,
    max_seq: int | None = None,
    max_commit: int | None = None,
    keys=None,
    progress=True,
    workers: int | None = None,
) -> Path:
    """Export the sparse denoising step of ``model`` to an ONNX file of standard ops.

    Two kinds of graph, by policy (docs/export.md lists what each holds):

    * a *layer-uniform* policy (``dense``, ``fixed``, ``prefix_cache``, ``dual_cache``): one
      graph that recomputes a row set ``rows`` (B, A) the host picks, for every layer. Inputs
      ``input_ids``, ``attention_mask``, ``position_ids`` (B, L), ``rows``, ``logit_positions``
      (B, P), ``hidden`` (B, L, D), ``k_cache_i`` / ``v_cache_i`` (B, KV, L, d); outputs ``logits``
      and the updated caches. B, L, A and P are dynamic. The layout arguments do not apply.
    * a *row* policy (``dyllm``, ``es_dllm``, ``dllm_cache`` and their compositions with a
      block cache): the policy's own step, with its gating (top-C selections, masks, gathers
      and scatters) inside the graph. One graph per kind of step the layout can reach (its
      plan keys grouped by all but their sizes: a span width, a capacity, ES-dLLM's kept
      counts are inputs ``size_i``, each the length of a 1-D tensor), all in this one file as
      branches of an ``If`` chain over the ``plan`` input, with the weights stored once. The
      cache and the policy's buffers are inputs and outputs; DyLLM's ``tau`` is an input. B,
      L (the prompt length), P and the sizes are dynamic.

    The policy's name and parameters, the diffusion spec, the state layout and the plan keys
    are stored in the file's metadata; :func:`~dyllm_fx.export.load_onnx` runs it.

    Args:
        model: a :class:`~dyllm_fx.TransformedModel`.
        path: the ``.onnx`` file to write.
        model_path: the model folder (or ``"default"``) whose tokenizer decodes the output;
            recorded so ``dyllm generate --onnx`` needs nothing else.
        opset: ONNX opset, at least 18.
        external_data: store the weights in a side file (``path.data``); default: only when
            the model exceeds protobuf's 2 GB limit.
        optimize: run onnxscript's graph optimizer (constant folding, dead code removal).
        gen_length, block_length, steps, threshold: the generations a row policy's export
            serves (``generate()``'s arguments; ``threshold=True`` for any confidence-threshold
            decoding); they fix the plan keys (``plan_keys.Layout``).
        max_seq: the longest prompt + response (default the model's window).
        max_commit: the most tokens one step commits (default from the schedule).
        keys: export exactly these plan keys (host or graph keys, e.g. the ones a calibration
            run met: :func:`~dyllm_fx.export.record_plan_keys`) instead of the layout's list.
        progress: a progress bar over the graphs on stderr with a time estimate (default);
            False: none; a callable: called as ``progress(i, key)`` as each branch's graph is
            done (``key`` the branch key, its sizes written ``"*"``).
        workers: processes that export a row policy's graphs side by side (default: one per
            CPU core, at most 8; 1 for a model on a GPU or where ``fork`` is missing).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    check_exportable(model)
    if opset < MIN_OPSET:
        raise ValueError(f"opset={opset} is too old: the step graph needs opset >= {MIN_OPSET}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    require_onnx_export()
    path = check_output_path(path, "to_onnx(path)")  # refused before any tracing
    if is_layer_uniform(model.policy):
        bar = graph_bar(1, progress)
        with bar, quiet_exporters():
            program, info = _rows_graph(model, model_path, opset, optimize)
            bar.update(1)
    else:
        from .plans import Layout, build_plan_step

        layout = Layout(gen_length, block_length, steps, threshold, max_seq, max_commit)
        built = build_plan_step(model, layout, keys)  # lists the keys and runs each branch once, eagerly
        workers = default_workers(len(built.branches), built.device) if workers is None else workers
        warn_length(len(built.branches), len(model.program.attn), model.policy.name, workers)
        bar = graph_bar(len(built.branches), progress)
        report = progress if callable(progress) else bar
        with bar, quiet_exporters():
            program = _plans_graph(built, opset, optimize, report, workers)
        info = built.graph_info(model, model_path)
    program.metadata_props.update(info.to_props())
    _save(program, path, external_data)
    return path


def _rows_graph(model, model_path, opset: int, optimize: bool):
    """(onnx_ir model, metadata) of a layer-uniform policy's step."""
    from .lowering import translation_table
    from .onnx_plans import onnx_program

    info = step_graph_info(model, model_path)
    step = ExportableStep(model.program).eval()
    device = next(model.parameters()).device
    args = example_inputs(model.program, device)
    dims = dynamic_shapes(step.n_layers)
    table = translation_table()
    return onnx_program(step, args, dims, info.inputs, info.outputs, opset, table, optimize), info


def _plans_graph(built, opset: int, optimize: bool, progress, workers: int):
    """The onnx_ir model of a row policy's step: one ``If`` branch per branch of ``built``."""
    from .lowering import translation_table
    from .onnx_plans import export_plans
    from .onnx_plans import optimize as optimize_model

    with built.tracing():
        program = export_plans(built, opset, translation_table(), progress, workers, optimize)
    if optimize:
        optimize_model(program, branches_optimized=True)
    return program


def _save(program, path: Path, external_data: bool | None) -> None:
    """Write an onnx_ir model; weights to ``path.data`` when asked or above protobuf's limit."""
    import onnx_ir as ir

    if external_data is None:
        total = sum(
            v.const_value.nbytes for v in program.graph.initializers.values() if v.const_value is not None
        )
        external_data = total > 1_800_000_000
    ir.save(program, str(path), external_data=f"{path.name}.data" if external_data else None)


__all__ = ["MIN_OPSET", "check_exportable", "check_policy", "require_onnx_export", "to_onnx"]
