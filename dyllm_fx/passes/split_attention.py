"""Pass 5 of 6: cut an attention piece at its core into the parts DyLLM-style layers call apart.

    attn[i](h, rows, *tables) -> h_mid, context          (the piece, with SDPA inside)
becomes three graphs over the same weights:

    query(h, rows, *tables)  -> q (B, H, A, d), mask     the query branch (and the SDPA mask)
    kv(h, rows, *tables)     -> k (B, KV, A, d), v       the key / value branches
    post(h, context)         -> h_mid                    o_proj + the residual add
    prefix(h, rows, *tables) -> k_prefix, v_prefix        keys in front of the rows (an encoder's
                                                         cache; None when the core has none)

so a layer can project queries for one row set and keys/values for another (DyLLM: queries of
every candidate row, K/V of the rows that changed), and run its own attention in between. Each
part is the piece's graph with the output moved and dead code removed, so whatever the model
does on the way (norms, biases, RoPE, GQA reshapes) is kept exactly. ``kv`` returns the rows'
own keys and values (``AttentionOperands.k_new``: before a key prefix is put in front and
before any GQA head repeat), which is what the step cache holds. Must run before
``rewrite_attention`` (it looks for the SDPA node).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .attention_operands import core_args, piece_operands
from .matching import SDPA, eliminate_dead_code, is_op
from .split_pieces import Piece, PieceError


@dataclass
class AttentionParts:
    query: fx.GraphModule
    kv: fx.GraphModule
    post: fx.GraphModule
    scale: float | None  # the core's softmax scale (None: 1/sqrt(d))
    has_mask: bool  # query() returns the core's mask second
    prefix: fx.GraphModule | None = None  # (k_prefix, v_prefix) read in front of the rows' keys


def _core(graph: fx.Graph) -> fx.Node:
    cores = [n for n in graph.nodes if is_op(n, SDPA)]
    if len(cores) != 1:
        raise PieceError(f"expected one attention core in the piece, found {len(cores)}")
    return cores[0]


def _part(root: fx.GraphModule, outputs, replace_core_with_input: str | None = None) -> fx.GraphModule:
    """A copy of root's graph returning ``outputs`` (names of root nodes); optionally the core
    becomes a new input. Unused placeholders other than the first two are kept so every part
    of a piece is called the same way."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    core = _core(root.graph)
    for node in root.graph.nodes:
        if node.op == "output":
            continue
        if node is core and replace_core_with_input:
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "placeholder" and replace_core_with_input and node.name == "h":
            env[core] = graph.placeholder(replace_core_with_input)
            env[core].meta = dict(core.meta)
    by_name = {n.name: n for n in root.graph.nodes}
    result = tuple(env[by_name[name]] for name in outputs)
    graph.output(result if len(result) > 1 else result[0])
    eliminate_dead_code(graph)
    if replace_core_with_input:  # post(h, context): drop the row and table inputs
        for node in [
            n for n in graph.nodes if n.op == "placeholder" and n.name not in ("h", replace_core_with_input)
        ]:
            if not node.users:
                graph.erase_node(node)
    graph.lint()
    # GraphModule(root, graph) shares root's parameters (no copy).
    return fx.GraphModule(root, graph, class_name=f"{type(root).__name__}_part")


def split_attention(piece: Piece) -> AttentionParts:
    """The query / kv / post (/ prefix) parts of one attention piece (see the module doc)."""
    ops = piece_operands(piece.gm.graph)
    core = ops.core
    if ops.is_causal:
        raise PieceError(
            f"attention node '{core.name}' is causal; dyllm-fx rewrites bidirectional models only"
        )
    if ops.dropout_p:
        raise PieceError(f"attention node '{core.name}' uses dropout; call model.eval() before transforming")
    mask = core_args(core).get("attn_mask")
    if mask is not None and not isinstance(mask, fx.Node):
        raise PieceError(f"attention node '{core.name}' has a constant mask; expected a tensor or None")
    q_out = [ops.query.name] + ([mask.name] if mask is not None else [])
    post_outputs = [n for n in piece.gm.graph.nodes if n.op == "output"][0].args[0]
    h_mid = post_outputs[0] if isinstance(post_outputs, (tuple, list)) else post_outputs
    return AttentionParts(
        query=_part(piece.gm, q_out),
        kv=_part(piece.gm, [ops.k_new.name, ops.v_new.name]),
        post=_part(piece.gm, [h_mid.name], replace_core_with_input="context"),
        scale=ops.scale,
        has_mask=mask is not None,
        prefix=_part(piece.gm, [ops.k_prefix.name, ops.v_prefix.name]) if ops.has_prefix else None,
    )


__all__ = ["AttentionParts", "split_attention"]
