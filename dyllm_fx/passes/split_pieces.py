"""Pass 4 of 6: cut the captured graph into pieces that run on a subset of rows.

    prologue(input_ids, attention_mask, position_ids) -> h0 (B, L, D), *tables
    attn[i](h (B, A, D), rows (B, A), *tables)        -> h_mid (B, A, D), context (B, H, A, d)
    mlp[i](h_mid (B, A, D), rows)                     -> mlp branch output (B, A, D)
    epilogue(h (B, P, D), positions (B, P))           -> logits (B, P, V)

Every piece takes its rows (B, A) second, whether it gathers with them or not.

*Tables* are tensors the blocks read that do not depend on the residual stream (RoPE cos/sin,
attention masks). A piece receives them whole and gathers the rows it needs: the pass inserts
``gather_rows(table, rows, dim)`` on every table with a sequence dimension, except masks that
only feed the attention core, whose key dimension must stay whole.

A model whose step takes extra inputs (``CapturedGraph.input_names`` beyond the three) gets
them as prologue inputs too; what the blocks read of them (an encoder's K/V prefix, its key
mask) becomes tables like the others, and ``StepProgram.h0_reads_state`` records whether the
first hidden state depends on them (self-conditioning on the last step's logits: then every
row's input moves at every step, whatever its token).

Each attention piece is cut at the block's ``stream_in``: the previous block's output, so
row-wise ops between two blocks (a layer scale) run at the start of the next block's piece
(and of the epilogue after the last block).

Sizes inside a piece are re-bound: a symbolic size that was the sequence length of
``input_ids`` becomes the row count of the piece's input, so ``view(B, L, H, d)`` in the
captured graph becomes ``view(B, A, H, d)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from dyllm_fx.kernels.dispatch import gather_rows
from dyllm_fx.vocab_parallel import VocabShard

from .attention_operands import piece_operands
from .capture import INPUT_NAMES, CapturedGraph
from .find_blocks import BlockMatch
from .matching import SDPA, descendants, extract_outputs, is_op, is_tensor
from .tensor_parallel import collective_group

aten = torch.ops.aten


class PieceError(ValueError):
    """A block whose graph cannot run on a subset of rows; the message names the node."""


@dataclass
class Piece:
    gm: fx.GraphModule
    tables: list[str]  # names of the prologue tables it takes, after its row inputs
    gathered: list[str] = field(default_factory=list)  # the tables it gathers by row (the rest pass whole)
    replaced: dict[str, str] = field(default_factory=dict)  # original node -> what it became


@dataclass
class StepProgram:
    """The step graph, piecewise: what the sparse-step runtime executes."""

    prologue: fx.GraphModule
    table_names: list[str]  # prologue outputs after h0, in order
    attn: list[Piece]
    mlp: list[Piece]
    epilogue: Piece
    blocks: list[BlockMatch]
    kv_shapes: list[
        tuple[tuple[int, ...], tuple[int, ...]]
    ]  # per layer: the rows' K and V shapes without (B, L)
    attn_heads: list[int]  # per layer: query heads (= the context's head count)
    kv_dtype: torch.dtype
    hidden_size: int
    hidden_dtype: torch.dtype
    param_names: dict[str, str]
    # Per layer: the attention piece cut at its core (query / kv / post), for layers that
    # run their own attention (DyLLM); filled by the pipeline's split_attention pass.
    attn_parts: list = field(default_factory=list)
    # the step's inputs: input_ids, attention_mask, position_ids, then the model's extra inputs
    input_names: tuple[str, ...] = INPUT_NAMES
    # whether the first hidden state reads extra step inputs (self-conditioning), so that every
    # row's layer-0 input may change between steps even where its token does not
    h0_reads_state: bool = False
    # the process group a tensor-parallel shard sums over (None: the whole model in one
    # process); read from the captured graph's all-reduces (passes/tensor_parallel.py)
    tensor_parallel_group: str | None = None
    # a head split over the vocabulary: the logits are this slice (the model's spec says so;
    # the transformed model copies it here for the policies that read logits inside the step)
    vocab_shard: VocabShard | None = None


class _Cutter:
    """Shared state for cutting pieces out of one captured graph."""

    def __init__(self, cg: CapturedGraph):
        self.cg = cg
        self.graph = cg.gm.graph
        self.user_inputs = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.from_inputs = descendants(self.user_inputs)
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.tables: dict[str, fx.Node] = {}

    def _dim_roles(self, node: fx.Node) -> list[str]:
        """For each dim of a tensor node: 'batch', 'seq' or '' (anything else)."""
        roles = []
        for size in node.meta["val"].shape:
            s = str(size)
            roles.append("seq" if s == self.cg.seq_symbol else "batch" if s == self.cg.batch_symbol else "")
        return roles

    def cut(
        self, name: str, row_input: fx.Node, outputs: list[fx.Node], attention: fx.Node | None = None
    ) -> Piece:
        roles = self._dim_roles(row_input)
        if roles[:2] != ["batch", "seq"]:
            raise PieceError(
                f"{name}: the residual stream '{row_input.name}' is not laid out (batch, seq, hidden)"
            )
        inside = descendants([row_input])
        members: list[fx.Node] = []
        externals: list[fx.Node] = []
        seen: set[fx.Node] = {row_input}
        stack = list(outputs)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in inside or node.op == "get_attr" or node not in self.from_inputs or _is_size(node):
                members.append(node)
                if not _is_size(node) or node in inside or node.target is not aten.sym_size.int:
                    stack.extend(node.all_input_nodes)
            else:
                externals.append(node)
        members.sort(key=self.order.__getitem__)
        externals.sort(key=self.order.__getitem__)
        return self._build(name, row_input, members, externals, outputs, attention)

    def _build(self, name, row_input, members, externals, outputs, attention) -> Piece:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        h = g.placeholder("h")
        h.meta["val"] = row_input.meta["val"]
        env[row_input] = h
        rows = g.placeholder("rows")
        mask_only = (
            {attention.args[3] if len(attention.args) > 3 else attention.kwargs.get("attn_mask")}
            if attention
            else set()
        )
        table_names = []
        for ext in externals:
            if not is_tensor(ext):
                raise PieceError(
                    f"{name}: needs '{ext.name}', a value computed from the inputs that is not a tensor"
                )
            table_names.append(ext.name)
            self.tables[ext.name] = ext
            ph = g.placeholder(ext.name)
            ph.meta["val"] = ext.meta["val"]
            seq_dims = [d for d, r in enumerate(self._dim_roles(ext)) if r == "seq"]
            if ext in mask_only and all(is_op(u, SDPA) for u in ext.users):
                env[ext] = ph  # the attention op gathers the query rows of a full mask itself
            elif len(seq_dims) == 1:
                env[ext] = g.call_function(gather_rows, (ph, rows, seq_dims[0]))
            elif not seq_dims:
                env[ext] = ph
            else:
                raise PieceError(
                    f"{name}: input '{ext.name}' has several sequence dimensions {seq_dims} and is not an "
                    "attention mask"
                )
        gathered = [n for n in table_names if env[self.tables[n]].op == "call_function"]
        replaced = {}
        for node in members:
            if node.op == "call_function" and node.target is aten.sym_size.int and node.args[0] not in env:
                env[node] = self._rebind_size(g, node, h, name)
                replaced[node.name] = f"size of the active rows ({env[node].name})"
            else:
                env[node] = g.node_copy(node, lambda n: env[n])
        result = tuple(env[o] for o in outputs)
        g.output(result if len(result) > 1 else result[0])
        gm = fx.GraphModule(self.cg.gm, g, class_name=name)
        return Piece(gm, table_names, gathered, replaced)

    def _rebind_size(self, g: fx.Graph, node: fx.Node, h: fx.Node, name: str) -> fx.Node:
        s = str(node.meta.get("val"))
        if s == self.cg.seq_symbol:
            return g.call_function(aten.sym_size.int, (h, 1))
        if s == self.cg.batch_symbol:
            return g.call_function(aten.sym_size.int, (h, 0))
        raise PieceError(f"{name}: cannot re-bind size '{node.name}' = {s} to the active rows")

    def prologue(self, h0: fx.Node) -> fx.GraphModule:
        wanted = [h0] + list(self.tables.values())
        return extract_outputs(self.graph, self.cg.gm, wanted, class_name="prologue")


def _is_size(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return not isinstance(val, torch.Tensor) and (
        isinstance(val, (torch.SymInt, int)) or node.target is aten.sym_size.int
    )


def split_pieces(cg: CapturedGraph, blocks: list[BlockMatch]) -> StepProgram:
    cutter = _Cutter(cg)
    attn, mlp, kv_shapes, heads = [], [], [], []
    for b in blocks:
        piece = cutter.cut(
            f"attn_{b.index}", b.stream_in or b.h_in, [b.h_mid, b.attention], attention=b.attention
        )
        attn.append(piece)
        mlp.append(cutter.cut(f"mlp_{b.index}", b.h_mid, [b.mlp_out]))
        operands = piece_operands(piece.gm.graph)
        k, v = operands.k_new.meta["val"], operands.v_new.meta["val"]
        heads.append(int(b.attention.args[0].meta["val"].shape[1]))
        kv_shapes.append(
            (
                tuple(int(d) for d in k.shape[1:2]) + (int(k.shape[3]),),
                tuple(int(d) for d in v.shape[1:2]) + (int(v.shape[3]),),
            )
        )
    output = next(n for n in cg.gm.graph.nodes if n.op == "output")
    logits = output.args[0]
    epilogue = cutter.cut("epilogue", blocks[-1].h_out, [logits])
    if epilogue.tables:
        raise PieceError(f"the LM head reads inputs other than the final hidden state: {epilogue.tables}")
    h0 = blocks[0].h_in
    prologue = cutter.prologue(h0)
    hval = h0.meta["val"]
    extras = [n for n in cg.gm.graph.nodes if n.op == "placeholder"][len(INPUT_NAMES) :]
    return StepProgram(
        prologue=prologue,
        table_names=list(cutter.tables),
        attn=attn,
        mlp=mlp,
        epilogue=epilogue,
        blocks=blocks,
        kv_shapes=kv_shapes,
        attn_heads=heads,
        kv_dtype=blocks[0].attention.args[1].meta["val"].dtype,
        hidden_size=int(hval.shape[-1]),
        hidden_dtype=hval.dtype,
        param_names=cg.param_names,
        tensor_parallel_group=collective_group(cg.gm.graph),
        input_names=tuple(cg.input_names),
        h0_reads_state=any(_depends(h0, e) for e in extras),
    )


def _depends(node: fx.Node, on: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is on:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False
