"""The op vocabulary the structural passes match on (aten, pre-dispatch spelling)."""

from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten

LINEAR = {aten.linear.default}
SDPA = {aten.scaled_dot_product_attention.default}
ADD = {aten.add.Tensor}
EMBEDDING = {aten.embedding.default}


# Ops fx keeps alive although they have no effect a piece depends on: SDPA (tagged
# nondeterministic for its dropout, which split_attention checks is off) and the functional
# collectives of a tensor-parallel graph (an all-reduce whose sum no output reads is dropped on
# every rank alike, since every rank cuts the same graph).
_PURE_WHEN_UNUSED = ("_c10d_functional.",)


def eliminate_dead_code(graph: fx.Graph) -> None:
    """fx's dead-code sweep, with unused attention cores and collectives counted as dead."""

    def impure(node: fx.Node) -> bool:
        if is_op(node, SDPA) or (
            node.op == "call_function" and str(node.target).startswith(_PURE_WHEN_UNUSED)
        ):
            return False
        return node.is_impure()

    graph.eliminate_dead_code(is_impure_node=impure)


def is_op(node: fx.Node, ops: set) -> bool:
    return node.op == "call_function" and node.target in ops


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if is_tensor(a)]


def is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def is_symbolic_scalar(node: fx.Node) -> bool:
    """Nodes that compute sizes (sym_size, arithmetic on SymInts) rather than tensors."""
    val = node.meta.get("val")
    return isinstance(
        val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)
    ) or node.target in (
        operator.mul,
        operator.add,
        operator.sub,
        operator.floordiv,
        aten.sym_size.int,
    )


def descendants(roots) -> set[fx.Node]:
    """Every node that reads, directly or not, one of ``roots`` (a node or an iterable of nodes),
    the roots included."""
    roots = [roots] if isinstance(roots, fx.Node) else list(roots)
    seen, stack = set(roots), list(roots)
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def ancestors(nodes) -> set[fx.Node]:
    """Every node that one of ``nodes`` (an iterable of nodes) reads, directly or not, the nodes
    included."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def extract_outputs(
    graph: fx.Graph, root: torch.nn.Module, outputs: list[fx.Node], class_name: str = "GraphModule"
) -> fx.GraphModule:
    """A module computing the tuple of ``outputs`` from the inputs of ``graph`` (every placeholder,
    in order), running only their ancestors; ``root`` holds the parameters they read."""
    needed = ancestors(outputs)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder" or node in needed:
            env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(root, sub, class_name=class_name)
