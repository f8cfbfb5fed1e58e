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
