"""Pass 3 of 6: find the transformer blocks in a captured graph from its structure.

A block is recognised from data flow, not module names:

    h_in ──norm──> linear (q) ─┐
                 ├> linear (k) ─┼─> attention core (SDPA) ──> linear (o) ─┐
                 └> linear (v) ─┘                                        add ──> h_mid
    h_in ────────────────────────────────────────────────────────────────┘
    h_mid ──norm──> linears (MLP) ──> mlp_out ──> add(h_mid, mlp_out) = h_out = next block's h_in

So LLaDA (ff_proj/up_proj/ff_out), Dream and transformers Llama/Qwen2 (gate/up/down) all
match, whatever their modules are called. What sits on the branches is free, so the same match
covers:

* norms before *and after* attention and the MLP (Gemma: ``h_mid = h + post_norm(o(...))``);
* any MLP branch with linear layers in it: gated MLPs, a mixture of experts with its router
  (the router and the experts run on whatever rows the MLP piece gets, so gating an MoE MLP
  by row routes only those rows), a dense MLP and experts in parallel;
* attention over extra keys that are not rows of the sequence (an encoder's K/V prefix
  concatenated in front of the new keys, see ``passes/attention_operands.py``).

Between two blocks the residual stream may pass through row-wise ops that read nothing but the
stream and constants (Gemma's ``h *= layer_scalar``, a dtype cast): the next block's pieces
are cut at the previous block's output and recompute those ops themselves (``stream_in``).
Scaled embeddings, self-conditioning and anything else before the first block belong to the
prologue; final norms and logit soft-capping to the epilogue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from torch import fx

from .matching import ADD, LINEAR, SDPA, is_op, is_tensor, tensor_inputs

aten = torch.ops.aten
# Row-wise ops the residual stream may pass through between two blocks (with constants only).
_STREAM_OPS = {
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.div.Tensor,
    aten.div.Scalar,
    aten.add.Tensor,
    aten.add.Scalar,
    aten.sub.Tensor,
    aten.sub.Scalar,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.type_as.default,
    aten.clone.default,
}


class BlockMatchError(ValueError):
    """The graph does not have the block structure the compiler rewrites; names the node."""


# Appended to the messages below: what the compiler can rewrite, and the way out.
_LAYOUT = (
    ". dyllm_fx.transform() rewrites sequential blocks h = x + o(sdpa(q(n(x)), k(n(x)), v(n(x)))); "
    "out = h + mlp(n(h)); write the model's blocks in that form, or generate with the untransformed model"
)


@dataclass
class BlockMatch:
    index: int
    h_in: fx.Node
    q_proj: fx.Node
    k_proj: fx.Node
    v_proj: fx.Node
    attention: fx.Node
    o_proj: fx.Node
    h_mid: fx.Node
    mlp_out: fx.Node
    h_out: fx.Node
    mlp_linears: list[fx.Node] = field(default_factory=list)
    # Where the block's pieces are cut: the previous block's h_out (h_in may be computed from it
    # by row-wise ops, e.g. Gemma's layer scalar), h_in for the first block.
    stream_in: fx.Node | None = None


class _Reach:
    """Memoised 'does node a depend on node b', pruned by topological order (no recursion,
    so 32-layer graphs are fine)."""

    def __init__(self, graph: fx.Graph):
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self._memo: dict[tuple[fx.Node, fx.Node], bool] = {}

    def depends(self, node: fx.Node, on: fx.Node) -> bool:
        key = (node, on)
        if key not in self._memo:
            self._memo[key] = on in self.between(node, on)
        return self._memo[key]

    def between(self, node: fx.Node, on: fx.Node) -> set[fx.Node]:
        """Ancestors of ``node`` (inclusive) that come after ``on`` in the graph, plus ``on`` if reached."""
        floor = self.order[on]
        seen, stack = {node}, [node]
        while stack:
            for a in stack.pop().all_input_nodes:
                if a not in seen and self.order[a] >= floor:
                    seen.add(a)
                    stack.append(a)
        return seen


def _nearest(start: fx.Node, ops: set, forward: bool, limit: int = 64) -> fx.Node | None:
    """Breadth-first search from ``start`` (producers or users) for the first node of ``ops``."""
    seen, queue = {start}, deque([start])
    while queue and len(seen) < limit:
        node = queue.popleft()
        nxt = list(node.users) if forward else tensor_inputs(node)
        for n in nxt:
            if n in seen:
                continue
            if is_op(n, ops):
                return n
            if not is_op(n, SDPA):
                seen.add(n)
                queue.append(n)
    return None


def find_blocks(gm: fx.GraphModule) -> list[BlockMatch]:
    """Match every attention core to its projections, residual adds and MLP."""
    reach = _Reach(gm.graph)
    cores = [n for n in gm.graph.nodes if is_op(n, SDPA)]
    if not cores:
        raise BlockMatchError(
            "no attention core (aten.scaled_dot_product_attention) in the graph; load transformers models "
            "with attn_implementation='sdpa' so attention appears as one op"
        )
    blocks: list[BlockMatch] = []
    for i, core in enumerate(cores):
        where = f"block {i} (attention node '{core.name}')"
        proj = {}
        for role, arg in zip(("q", "k", "v"), core.args[:3]):
            lin = arg if is_op(arg, LINEAR) else _nearest(arg, LINEAR, forward=False)
            if lin is None:
                raise BlockMatchError(
                    f"{where}: no linear projection feeds the attention's {role} input '{arg.name}'" + _LAYOUT
                )
            proj[role] = lin
        o_proj = _nearest(core, LINEAR, forward=True)
        if o_proj is None:
            raise BlockMatchError(
                f"{where}: no output projection (linear) consumes the attention output" + _LAYOUT
            )
        h_mid, h_in = _residual_add(o_proj, core, reach)
        if h_mid is None:
            raise BlockMatchError(
                f"{where}: no residual add joins the output projection '{o_proj.name}' to the block input"
                + _LAYOUT
            )
        if not all(reach.depends(p.args[0], h_in) for p in proj.values()):
            raise BlockMatchError(
                f"{where}: the q/k/v projections do not read the residual stream '{h_in.name}'" + _LAYOUT
            )
        h_out, mlp_out = _mlp_residual(h_mid, reach)
        if h_out is None:
            raise BlockMatchError(
                f"{where}: no MLP branch added back onto '{h_mid.name}' after attention (parallel attention "
                "+ MLP "
                "blocks, GPT-J style, are not supported)" + _LAYOUT
            )
        span = reach.between(mlp_out, h_mid)
        mlp_linears = [
            n for n in gm.graph.nodes if n in span and is_op(n, LINEAR) and reach.depends(n, h_mid)
        ]
        if not mlp_linears:
            raise BlockMatchError(
                f"{where}: the branch '{mlp_out.name}' after attention has no linear layers" + _LAYOUT
            )
        stream_in = h_in
        if blocks:
            stream_in = blocks[-1].h_out
            if not _row_wise_chain(stream_in, h_in):
                raise BlockMatchError(
                    f"{where}: its input '{h_in.name}' is not the previous block's output '{stream_in.name}' "
                    "(nor that "
                    "output passed through row-wise ops with constants, such as a scale or a cast); the "
                    "compiler needs "
                    "the residual stream to run from one block into the next (no norm, mixing or other input "
                    "between "
                    "a block's last add and the next block)" + _LAYOUT
                )
        blocks.append(
            BlockMatch(
                i,
                h_in,
                proj["q"],
                proj["k"],
                proj["v"],
                core,
                o_proj,
                h_mid,
                mlp_out,
                h_out,
                mlp_linears,
                stream_in,
            )
        )
    return blocks


def _row_wise_chain(src: fx.Node, dst: fx.Node, limit: int = 8) -> bool:
    """Whether ``dst`` is ``src`` or computed from it by a chain of row-wise ops (see
    ``_STREAM_OPS``) whose other operands are constants (parameters, buffers, Python numbers)."""
    node = dst
    for _ in range(limit + 1):
        if node is src:
            return True
        if not is_op(node, _STREAM_OPS):
            return False
        data = [a for a in tensor_inputs(node) if not _constant(a)]
        if len(data) != 1 or data[0].meta["val"].shape != node.meta["val"].shape:
            return False
        # a constant spread over the sequence (a per-position table) would make the op depend on
        # the row's position, which a piece run on gathered rows cannot see
        if any(_spans_rows(a) for a in tensor_inputs(node) if a is not data[0]):
            return False
        node = data[0]
    return False


def _spans_rows(node: fx.Node) -> bool:
    """Whether a constant operand has extent in any dim but the last (so it is not one value
    per feature, the same for every row)."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and any(int(d) != 1 for d in val.shape[:-1])


def _constant(node: fx.Node) -> bool:
    """A value that does not depend on the graph's inputs (parameters, buffers and ops on them)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return False
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return True


def _residual_add(o_proj: fx.Node, core: fx.Node, reach: _Reach) -> tuple[fx.Node | None, fx.Node | None]:
    """The add(h_in, attention branch) after the output projection, and h_in."""
    queue, seen = deque([o_proj]), {o_proj}
    while queue:
        node = queue.popleft()
        for user in node.users:
            if user in seen or not is_tensor(user):
                continue
            if is_op(user, ADD) and len(tensor_inputs(user)) == 2:
                a, b = user.args[:2]
                other = b if reach.depends(a, o_proj) else a
                if not reach.depends(other, core):
                    return user, other
            seen.add(user)
            queue.append(user)
    return None, None


def _mlp_residual(h_mid: fx.Node, reach: _Reach) -> tuple[fx.Node | None, fx.Node | None]:
    """The add(h_mid, mlp(h_mid)) that closes the block."""
    for user in h_mid.users:
        if is_op(user, ADD) and len(user.args) >= 2:
            a, b = user.args[:2]
            if a is h_mid and isinstance(b, fx.Node) and b is not h_mid and reach.depends(b, h_mid):
                return user, b
            if b is h_mid and isinstance(a, fx.Node) and a is not h_mid and reach.depends(a, h_mid):
                return user, a
    return None, None
