"""``dyllm_fx.explain``: what the compiler found and what it rewrote, in words."""

from __future__ import annotations

from torch import fx


def _param(program, node: fx.Node) -> str:
    """The source parameter name of a linear node's weight (or the node name)."""
    weight = node.args[1] if len(node.args) > 1 else None
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return program.param_names.get(weight.target, weight.target).removesuffix(".weight")
    return node.name


def explain(model) -> str:
    """A report of the passes' work on a TransformedModel (or the backend's compiled callable)."""
    built = getattr(model, "transformed", None)
    if isinstance(built, list):
        if not built:
            return "the dyllm backend builds its program on the first call; call the compiled model once first"
        model = built[0]
    program = model.program
    policy = model.engine.policy
    lines = [
        f"dyllm-fx step program: {len(program.blocks)} blocks, policy '{policy.name}'",
        f"prologue: embeddings + {len(program.table_names)} row tables ({', '.join(program.table_names) or 'none'}), all rows",
    ]
    for block, attn, mlp in zip(program.blocks, program.attn, program.mlp):
        k_shape, v_shape = program.kv_shapes[block.index]
        lines.append(f"block {block.index}: residual '{block.h_in.name}' -> '{block.h_out.name}'")
        lines.append(
            f"  q/k/v  {_param(program, block.q_proj)}, {_param(program, block.k_proj)}, {_param(program, block.v_proj)}"
            " -> run on active rows"
        )
        for original, new in attn.replaced.items():
            lines.append(f"  {original} -> {new}")
        if attn.gathered:
            lines.append(f"  tables {', '.join(attn.gathered)} -> gather_rows(active rows)")
        whole = [t for t in attn.tables if t not in attn.gathered]
        if whole:
            lines.append(f"  masks  {', '.join(whole)} -> passed whole (keys of every row; the op gathers query rows)")
        lines.append(f"  o_proj {_param(program, block.o_proj)} -> active rows; K/V cache per layer {k_shape} / {v_shape} x (batch, seq)")
        lines.append(
            f"  mlp    {', '.join(_param(program, n) for n in block.mlp_linears)} -> gathered MLP on active rows, "
            "scattered into the cached layer output"
        )
    lines.append("epilogue: final norm + LM head on the positions the sampler reads only")
    return "\n".join(lines)
