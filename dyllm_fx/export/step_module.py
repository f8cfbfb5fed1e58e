"""One sparse step of a transformed model as a plain, functional ``nn.Module`` to export.

The runtime's engine (``runtime/sparse_step.py``) asks the policy for rows before every layer
and writes caches in place. An exported graph cannot call back into Python, so the exported
step takes *one* row set ``rows`` (B, A) that every layer recomputes, chosen on the host before
the step, and returns its caches instead of writing them:

    h0, tables = prologue(input_ids, attention_mask, position_ids)
    h = h0[rows]
    for each layer l:
        h_mid, K[l]', V[l]' = attn[l](h, rows, tables, K[l], V[l])   # K/V rows written functionally
        h = h_mid + mlp[l](h_mid)
    hidden' = hidden with hidden'[rows] = h
    logits = epilogue(hidden'[logit_positions])

This covers every *layer-uniform* policy: ``dense`` (rows = all positions), ``fixed`` and
Fast-dLLM's ``prefix_cache`` / ``dual_cache``. Policies that pick rows per layer from values
computed inside the step (DyLLM, ES-dLLM) are not expressible as one row set and are rejected
by :func:`check_layer_uniform`.

Only the final hidden state is carried between steps. With one row set for all layers, layer
l + 1 reads exactly the rows layer l wrote in the same step, so the per-layer hidden caches of
the engine are never read; the final one is, by the LM head at positions outside ``rows``.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from dyllm_fx.kernels import dispatch as kernel_ops
from dyllm_fx.kernels.cache_scatter import gather_rows
from dyllm_fx.passes.split_pieces import Piece, StepProgram
from dyllm_fx.runtime.policies import POLICIES, Policy

from . import functional_ops  # noqa: F401  (registers torch.ops.dyllm_export.*)

WRITE_ROWS = torch.ops.dyllm_export.cache_write_rows.default
# What rewrite_attention inserts for a cache write (the dispatching function; the op itself)
CACHE_WRITES = (kernel_ops.cache_write_rows, torch.ops.dyllm.cache_write_rows.default)

# The shipped policies whose rows depend only on the step's position in the schedule, the same
# for all layers (their class attribute ``layer_uniform``).
LAYER_UNIFORM_POLICIES: tuple[type[Policy], ...] = tuple(
    cls for cls in POLICIES.values() if cls.layer_uniform
)


class ExportError(ValueError):
    """The model or policy cannot be exported; the message says what to change."""


def is_layer_uniform(policy: Policy) -> bool:
    """True for policies that choose one row set per step, on the host, for every layer
    (``Policy.layer_uniform``; a custom policy class opts in by setting it)."""
    return getattr(policy, "layer_uniform", False) is True


def check_layer_uniform(policy: Policy) -> None:
    if not is_layer_uniform(policy):
        names = ", ".join(p.name for p in LAYER_UNIFORM_POLICIES)
        raise ExportError(
            f"policy {policy.name!r} is not layer-uniform: it chooses rows per layer inside the step, which "
            "a "
            f"layer-uniform step graph (one row set for every layer; it runs {names}) cannot express. Export "
            f"{policy.name!r}'s own step graph: dyllm export --onnx FILE --policy {policy.name} "
            f"(dyllm_fx.export.to_onnx on a model transformed with policy={policy.name!r})"
        )


def functional_attention(piece: Piece) -> fx.GraphModule:
    """A copy of an attention piece whose K/V cache writes are returned, not done in place.

    Input graph (after ``rewrite_attention``): ``cache_write_rows(k_cache, rows, k, 2)`` then
    ``partial_attention(q, k_cache, v_cache, ...)``. Output graph: ``k_new =
    dyllm_export.cache_write_rows(k_cache, rows, k, 2)``, attention over ``k_new``, and the piece
    returns ``(h_mid, context, k_new, v_new)``. Weights stay shared with the source piece.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    old_out = graph.graph_copy(piece.gm.graph, env)
    caches = {n.name: n for n in graph.nodes if n.op == "placeholder" and n.name in ("k_cache", "v_cache")}
    if set(caches) != {"k_cache", "v_cache"}:
        raise ExportError(
            f"{piece.gm.__class__.__name__}: no k_cache / v_cache inputs; run rewrite_attention first"
        )
    writes = [n for n in graph.nodes if n.op == "call_function" and n.target in CACHE_WRITES]
    updated = {}
    for node in writes:
        cache = node.args[0]
        with graph.inserting_before(node):
            new = graph.call_function(WRITE_ROWS, tuple(node.args))
        graph.erase_node(node)
        # Every later read of the cache (the attention) sees the written rows.
        cache.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        updated[cache.name] = new
    if set(updated) != {"k_cache", "v_cache"}:
        name = piece.gm.__class__.__name__
        raise ExportError(f"{name}: expected one cache write for each of K and V, found {len(writes)}")
    outputs = old_out if isinstance(old_out, tuple) else (old_out,)
    graph.output((*outputs, updated["k_cache"], updated["v_cache"]))
    graph.lint()
    return fx.GraphModule(piece.gm, graph, class_name=f"{piece.gm.__class__.__name__}_functional")


class ExportableStep(nn.Module):
    """One layer-uniform sparse step, functional: caches in, updated caches out.

    ``forward(input_ids, attention_mask, position_ids, rows, logit_positions, hidden, k_0, v_0,
    ..., k_{n-1}, v_{n-1}) -> (logits, hidden', k_0', v_0', ...)``:

    * ``input_ids``, ``attention_mask``, ``position_ids``: (B, L) int64;
    * ``rows``: (B, A) int64, the positions every layer recomputes (all of them on a cold cache);
    * ``logit_positions``: (B, P) int64, where the LM head runs (the current block, shifted by
      the model's logit shift);
    * ``hidden``: (B, L, D) final hidden state, ``k_l`` / ``v_l``: (B, KV, L, d) per layer.

    ``lower_ops=True`` replaces the custom ops by aten math (``aten_lowering``), for compilers
    that take aten graphs (torch_tensorrt); the ONNX export keeps them and translates them.
    """

    def __init__(self, program: StepProgram, lower_ops: bool = False):
        super().__init__()
        self.prologue = program.prologue
        self.attn = nn.ModuleList(functional_attention(p) for p in program.attn)
        self.write_rows = WRITE_ROWS
        if lower_ops:
            from .aten_lowering import lower_custom_ops, scatter_rows

            for gm in self.attn:
                lower_custom_ops(gm)
            self.write_rows = scatter_rows
        self.mlp = nn.ModuleList(p.gm for p in program.mlp)
        self.epilogue = program.epilogue.gm
        index = {name: i for i, name in enumerate(program.table_names)}
        self.attn_tables = [[index[name] for name in p.tables] for p in program.attn]
        self.mlp_tables = [[index[name] for name in p.tables] for p in program.mlp]

    @property
    def n_layers(self) -> int:
        return len(self.attn)

    def forward(self, input_ids, attention_mask, position_ids, rows, logit_positions, hidden, *kv):
        h0, *tables = self.prologue(input_ids, attention_mask, position_ids)
        h = gather_rows(h0, rows, 1)
        new_kv = []
        for layer in range(self.n_layers):
            attn_tables = [tables[i] for i in self.attn_tables[layer]]
            h_mid, _context, k, v = self.attn[layer](h, rows, *attn_tables, kv[2 * layer], kv[2 * layer + 1])
            mlp_tables = [tables[i] for i in self.mlp_tables[layer]]
            h = h_mid + self.mlp[layer](h_mid, rows, *mlp_tables)
            new_kv += [k, v]
        hidden = self.write_rows(hidden, rows, h, 1)
        logits = self.epilogue(gather_rows(hidden, logit_positions, 1), logit_positions)
        return (logits, hidden, *new_kv)


def input_names(n_layers: int) -> list[str]:
    caches = [f"{kind}_cache_{layer}" for layer in range(n_layers) for kind in ("k", "v")]
    return ["input_ids", "attention_mask", "position_ids", "rows", "logit_positions", "hidden", *caches]


def output_names(n_layers: int) -> list[str]:
    return ["logits", "hidden_out", *(f"{name}_out" for name in input_names(n_layers)[6:])]


def cache_shapes(program: StepProgram, batch: int, seq_len: int) -> list[tuple[int, ...]]:
    """Shapes of ``hidden`` and the per-layer K/V caches, in input order."""
    shapes = [(batch, seq_len, program.hidden_size)]
    for k_shape, v_shape in program.kv_shapes:
        shapes += [(batch, k_shape[0], seq_len, k_shape[1]), (batch, v_shape[0], seq_len, v_shape[1])]
    return shapes


def example_inputs(
    program: StepProgram,
    device: torch.device,
    batch: int = 2,
    seq_len: int = 24,
    active: int = 8,
    positions: int = 4,
) -> tuple[torch.Tensor, ...]:
    """Inputs to trace the step with. All four sizes differ, so no two dynamic dims get unified."""
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    mask = torch.ones(batch, seq_len, dtype=torch.long, device=device)
    pos = torch.arange(seq_len, device=device).expand(batch, -1).contiguous()
    rows = torch.arange(seq_len - active, seq_len, device=device).expand(batch, -1).contiguous()
    logit_pos = rows[:, :positions].contiguous()
    caches = []
    for i, shape in enumerate(cache_shapes(program, batch, seq_len)):
        dtype = program.hidden_dtype if i == 0 else program.kv_dtype
        caches.append(torch.zeros(shape, dtype=dtype, device=device))
    return (ids, mask, pos, rows, logit_pos, *caches)


def dynamic_shapes(n_layers: int, max_batch: int = 4096, max_seq: int = 1 << 20) -> tuple:
    """torch.export dims: batch, sequence, active rows and logit positions vary per call."""
    dim = torch.export.Dim
    batch, seq = dim("batch", min=1, max=max_batch), dim("seq", min=2, max=max_seq)
    active, npos = dim("active", min=1, max=max_seq), dim("positions", min=1, max=max_seq)
    tokens = {0: batch, 1: seq}
    kv = {0: batch, 2: seq}
    # The K/V caches arrive through ``*kv``: torch.export sees them as one nested tuple.
    return (
        tokens,
        tokens,
        tokens,
        {0: batch, 1: active},
        {0: batch, 1: npos},
        tokens,
        tuple([kv] * (2 * n_layers)),
    )


__all__ = [
    "ExportError",
    "ExportableStep",
    "LAYER_UNIFORM_POLICIES",
    "cache_shapes",
    "check_layer_uniform",
    "dynamic_shapes",
    "example_inputs",
    "functional_attention",
    "input_names",
    "is_layer_uniform",
    "output_names",
]
