"""ONNX export of a row policy's step: one graph per branch of plan keys, all in one file.

Each branch (``plan_keys.branches``: the plan keys the layout reaches, grouped by everything but
their sizes) is exported on its own with torch's dynamo exporter
(:class:`~dyllm_fx.export.policy_step.PolicyStep`; batch, sequence and the key's sizes
dynamic). The graphs are then merged into one model: the weights are stored once in the main
graph, and each graph becomes a branch of a chain of ``If`` nodes selected by the ``plan``
input (a 0-d int64, the branch's index in the file's metadata). Every branch has the same
inputs and outputs, so onnxruntime runs the file as one session with one I/O binding, whichever
key the host picks. onnxscript's optimizer then folds constants, lifts the branches' constants into the
main graph and deduplicates them (a weight transposed in every branch is stored once).
"""

from __future__ import annotations

import numpy as np
import torch

from .noise import quiet_exporters
from .policy_step import STEP_INPUTS, STEP_OUTPUTS, PolicyStep, dynamic_shapes, size_names
from .workers import run_forked

PLAN_INPUT = "plan"


def _ir():
    import onnx_ir as ir

    return ir


def onnx_program(module, args: tuple, dims, input_names, output_names, opset: int, table, optimize: bool):
    """``module`` through torch's dynamo ONNX exporter, as an ``onnx_ir`` model."""
    with torch.no_grad(), quiet_exporters():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dims,
            input_names=input_names,
            output_names=output_names,
            custom_translation_table=table,
            optimize=optimize,
            verbose=False,
        )
    return program.model


def export_branch(
    step: PolicyStep, key, args: tuple, dims, input_names, output_names, opset: int, table, optimize=False
):
    """One branch key's graph as an ``onnx_ir`` model, optimized on its own when asked (in the
    worker that exports it: the optimizer on the merged model walks every branch at once, and
    is slow)."""
    step.key = key
    return onnx_program(step, args, dims, input_names, output_names, opset, table, optimize=optimize)


def _fix_outputs(ir, graph, tag: str) -> None:
    """Branch outputs must be produced inside the branch, once each: an output that is an outer
    value (a state input passed through) or repeats another gets an Identity."""
    seen = set()
    for i, value in enumerate(list(graph.outputs)):
        if value.producer() is None or value.producer().graph is not graph or id(value) in seen:
            node = ir.Node("", "Identity", [value], name=f"{tag}pass_{i}")
            graph.append(node)
            node.outputs[0].type, node.outputs[0].shape = value.type, value.shape
            graph.outputs[i] = node.outputs[0]
        seen.add(id(graph.outputs[i]))


def merge_branches(models: list, shared: set[str]):
    """One model whose ``plan`` input picks which of ``models`` (same inputs and outputs) runs.

    ``shared``: initializer names that hold the same tensor in every model (the module's
    parameters): stored once in the main graph. Everything else keeps a per-branch name."""
    ir = _ir()
    first = models[0].graph
    inputs = [ir.Value(name=v.name, type=v.type, shape=v.shape) for v in first.inputs]
    plan = ir.Value(name=PLAN_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    output_names = [v.name for v in first.outputs]
    main_inits: dict[str, object] = {}
    branches = []
    for i, model in enumerate(models):
        graph, tag = model.graph, f"k{i}/"
        if [v.name for v in graph.inputs] != [v.name for v in inputs]:
            raise ValueError(
                f"branch {i} has inputs {[v.name for v in graph.inputs]}, not {[v.name for v in inputs]}"
            )
        for old, new in zip(list(graph.inputs), inputs):
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.inputs.clear()
        local = []
        for name in list(graph.initializers):
            value = graph.initializers.pop(name)
            if name in shared and name in main_inits:
                value.replace_all_uses_with(main_inits[name], replace_graph_outputs=True)
            elif name in shared:
                main_inits[name] = value
            else:
                local.append(value)
        for value in local:
            value.name = tag + value.name
            graph.initializers.add(value)
        for node in graph.all_nodes():
            node.name = tag + (node.name or node.op_type)
            for out in node.outputs:
                out.name = tag + (out.name or "v")
        _fix_outputs(ir, graph, tag)
        graph.name = f"plan_{i}"
        branches.append(graph)
    nodes = []
    conds = []
    for i in range(len(branches) - 1):
        index = ir.Node(
            "",
            "Constant",
            [],
            [ir.AttrTensor("value", ir.tensor(np.array(i, dtype=np.int64)))],
            name=f"plan_{i}_id",
        )
        equal = ir.Node("", "Equal", [plan, index.outputs[0]], name=f"is_plan_{i}")
        index.outputs[0].name, equal.outputs[0].name = f"plan_{i}_id", f"is_plan_{i}"
        nodes += [index, equal]
        conds.append(equal.outputs[0])
    reference = branches[0].outputs
    chosen = branches[-1]
    for i in range(len(branches) - 2, -1, -1):
        node = ir.Node(
            "",
            "If",
            [conds[i]],
            [ir.AttrGraph("then_branch", branches[i]), ir.AttrGraph("else_branch", chosen)],
            num_outputs=len(output_names),
            name=f"select_{i}",
        )
        for out, ref, name in zip(node.outputs, reference, output_names):
            out.name = name if i == 0 else f"select_{i}/{name}"
            out.type, out.shape = ref.type, ref.shape
        if i == 0:
            nodes.append(node)
            outputs = list(node.outputs)
        else:
            chosen = ir.Graph([], list(node.outputs), nodes=[node], name=f"select_{i}")
    if len(branches) == 1:  # one key: its graph is the model
        only = branches[0]
        nodes = list(only)
        only.remove(nodes)
        outputs = list(only.outputs)
        only.outputs.clear()
        for out, name in zip(outputs, output_names):
            out.name = name
        main_inits.update({v.name: v for v in list(only.initializers.values())})
        for name in list(only.initializers):
            only.initializers.pop(name)
    graph = ir.Graph(
        [*inputs, plan],
        outputs,
        nodes=nodes,
        initializers=list(main_inits.values()),
        opset_imports=dict(first.opset_imports),
        name="dyllm_step",
    )
    functions = {}
    for model in models:
        functions.update({f.identifier(): f for f in model.functions.values()})
    return ir.Model(
        graph, ir_version=models[0].ir_version, producer_name="dyllm-fx", functions=list(functions.values())
    )


def optimize(model, branches_optimized: bool = False) -> None:
    """onnxscript's optimizer on the merged model (folding, constant lifting), as
    ``torch.onnx.export(optimize=True)`` runs per graph (skipped when each branch was optimized
    before the merge), then the branches' constants lifted into the main graph and
    :func:`deduplicate`: the optimizer's own deduplication stops at 1024 elements, so each
    branch would keep its own copy of the folded (transposed) MLP and head weights."""
    import onnxscript.optimizer
    from onnx_ir.passes.common import LiftSubgraphInitializersToMainGraphPass

    with quiet_exporters():  # its deduplication logs each constant graph output: expected
        if not branches_optimized:
            onnxscript.optimizer.optimize_ir(model)
    LiftSubgraphInitializersToMainGraphPass()(model)
    deduplicate(model.graph)


def deduplicate(graph) -> int:
    """Replace every initializer of ``graph`` that equals an earlier one (dtype, shape and
    bytes) by that one; returns how many were removed. Compares a digest first, so only one
    tensor's bytes are held at a time."""
    import hashlib

    kept: dict[tuple, object] = {}
    removed = 0
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or value.is_graph_input() or value.is_graph_output():
            continue
        array = np.ascontiguousarray(tensor.numpy())
        if array.dtype == object:  # string tensors: none in a step graph
            continue
        # the IR's own shape: a torch-backed tensor's numpy() can differ in rank (scalar vs [1])
        key = (
            str(tensor.dtype),
            tuple(tensor.shape),
            hashlib.sha256(array.view(np.uint8).reshape(-1)).hexdigest(),
        )
        first = kept.get(key)
        if first is None:
            kept[key] = value
            continue
        if not np.array_equal(np.ascontiguousarray(first.const_value.numpy()), array):
            continue  # a digest collision: keep both
        value.replace_all_uses_with(first)
        graph.initializers.pop(value.name)
        removed += 1
    return removed


def input_names(state_names: list[str], params: list[str], n_sizes: int) -> list[str]:
    return [*STEP_INPUTS, *params, *size_names(n_sizes), *state_names]


def output_names(state_names: list[str]) -> list[str]:
    return [*STEP_OUTPUTS, *(f"{name}_out" for name in state_names)]


def export_plans(build, opset: int, table, progress=None, workers: int = 1, optimize: bool = False):
    """Every branch of ``build`` (:class:`~dyllm_fx.export.plans.PlanBuild`), merged.

    ``progress``: a tqdm bar advanced as each branch's graph is done, or a callable called as
    ``progress(i, key)`` for each branch, or None. ``workers``: processes that export branches
    side by side (``workers.run_forked``); the merged model is the same whichever finishes
    first. ``optimize``: each branch optimized by its worker before the merge (then finish the
    merged model with ``optimize(model, branches_optimized=True)``)."""
    step = build.step
    names_in = build.input_names()
    names_out = output_names(step.layout.names)

    def branch(i: int):
        b = build.branches[i]
        dims = dynamic_shapes(step.layout, len(step.params), step.n_sizes, b.min_seq, b.max_seq)
        return export_branch(step, b.key, build.example(i), dims, names_in, names_out, opset, table, optimize)

    models: list = [None] * len(build.branches)
    for i, model in run_forked(branch, len(build.branches), workers):
        models[i] = model
        if callable(progress):
            progress(i, build.branches[i].key)
        elif progress is not None:
            progress.set_postfix_str(str(build.branches[i].key), refresh=False)
            progress.update(1)
    shared = {name for name, _ in step.named_parameters(remove_duplicate=False)}
    shared |= {name for name, _ in step.named_buffers(remove_duplicate=False)}
    return merge_branches(models, shared)


__all__ = [
    "PLAN_INPUT",
    "deduplicate",
    "export_branch",
    "export_plans",
    "input_names",
    "merge_branches",
    "onnx_program",
    "optimize",
    "output_names",
]
