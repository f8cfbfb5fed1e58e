"""``dyllm_fx.explain``: what the compiler found, what it rewrote, and what each step runs."""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx

# The ops a policy's per-layer choices are made of (aten names), and the attention ops.
GATING_OPS = (
    "sort",
    "topk",
    "gather",
    "scatter",
    "scatter_reduce",
    "index_select",
    "where",
    "lt",
    "ne",
    "eq",
    "ge",
    "minimum",
    "amax",
    "sum",
    "cat",
)
ATTENTION_OPS = (
    "scaled_dot_product_attention",
    "bmm",
    "baddbmm",
    "softmax",
    "_softmax",
    "exp",
    "linalg_vecdot",
)


def _param(program, node: fx.Node) -> str:
    """The source parameter name of a linear node's weight (or the node name)."""
    weight = node.args[1] if len(node.args) > 1 else None
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return program.param_names.get(weight.target, weight.target).removesuffix(".weight")
    return node.name


def _model(model):
    built = getattr(model, "transformed", None)
    if isinstance(built, list):
        if not built:
            raise ValueError(
                "the dyllm backend builds its program on the first call; call the compiled model once first"
            )
        return built[0]
    return model


def explain(model, steps: bool = True) -> str:
    """A report of the passes' work on a TransformedModel (or the backend's compiled callable)
    and, with ``steps``, of the step graph of each kind of step the policy plans (traced on a
    small synthetic generation): how many ops it has, and which of them make the policy's
    choices (top-C selections, gathers, masked writes) and the attention."""
    try:
        model = _model(model)
    except ValueError as err:
        return str(err)
    program = model.program
    policy = model.engine.policy
    lines = [
        f"dyllm-fx step program: {len(program.blocks)} blocks, policy '{policy.name}'",
        f"prologue: embeddings + {len(program.table_names)} row tables "
        f"({', '.join(program.table_names) or 'none'}), all rows",
    ]
    for block, attn in zip(program.blocks, program.attn):
        k_shape, v_shape = program.kv_shapes[block.index]
        lines.append(f"block {block.index}: residual '{block.h_in.name}' -> '{block.h_out.name}'")
        lines.append(
            f"  q/k/v  {_param(program, block.q_proj)}, {_param(program, block.k_proj)}, "
            f"{_param(program, block.v_proj)}"
            " -> run on active rows"
        )
        for original, new in attn.replaced.items():
            lines.append(f"  {original} -> {new}")
        if attn.gathered:
            lines.append(f"  tables {', '.join(attn.gathered)} -> gather_rows(active rows)")
        whole = [t for t in attn.tables if t not in attn.gathered]
        if whole:
            lines.append(
                f"  masks  {', '.join(whole)} -> passed whole (keys of every row; the op gathers query rows)"
            )
        lines.append(
            f"  o_proj {_param(program, block.o_proj)} -> active rows; K/V cache per layer {k_shape} / "
            f"{v_shape} x (batch, seq)"
        )
        lines.append(
            f"  mlp    {', '.join(_param(program, n) for n in block.mlp_linears)} -> gathered MLP on active "
            "rows"
        )
    lines.append("epilogue: final norm + LM head on the positions the sampler reads only")
    if steps and model.diffusion is not None:
        lines.append(
            "step graphs (traced on a synthetic generation: batch 1, prompt 8, response 16, block 8):"
        )
        for key, graph in step_graphs(model).items():
            lines.append(f"  {key}: {_summary(graph)}")
    return "\n".join(lines)


def _summary(graph: fx.GraphModule) -> str:
    ops = Counter(
        n.target.overloadpacket.__name__
        for n in graph.graph.nodes
        if n.op == "call_function" and hasattr(n.target, "overloadpacket")
    )
    total = sum(ops.values())
    gating = ", ".join(f"{op} x{ops[op]}" for op in GATING_OPS if ops[op])
    attention = ", ".join(f"{op} x{ops[op]}" for op in ATTENTION_OPS if ops[op])
    return f"{total} aten ops; gating: {gating or 'none'}; attention: {attention or 'none'}"


def step_graphs(model, prompt: int = 8, response: int = 16, block: int = 8, steps: int = 16) -> dict:
    """The step graph (an aten fx graph, traced with make_fx) of each plan key a throwaway
    copy of the model's policy uses on a synthetic generation that commits one token a step.
    The model's own engine and policy are left untouched."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from .runtime.engine import StepEngine
    from .runtime.policies import StepInputs

    model = _model(model)
    spec = model.diffusion
    engine = StepEngine(model.program, copy.deepcopy(model.engine.policy))
    device = next(model.parameters()).device
    seq_len = prompt + response
    ids = torch.full((1, seq_len), spec.mask_token_id, dtype=torch.long, device=device)
    ids[:, :prompt] = (torch.arange(prompt, device=device) % 5) + 3
    pos = torch.arange(seq_len, device=device)[None]
    graphs: dict = {}

    def trace(plan, inp):
        cache, buffers = engine.cache, engine.buffers
        clones = copy.deepcopy((cache, buffers))  # tracing runs the step: keep the real state
        fn = lambda i: engine.policy.step(engine.pieces, plan, i, *clones)  # noqa: E731
        graphs[plan.key] = make_fx(fn)(inp)

    real_plan = engine.policy.plan
    with torch.no_grad():
        for step in range(steps):
            start = prompt + (step // block) * block  # one token a step: a block every `block` steps
            shift = spec.logits_shift
            positions = torch.arange(start - shift, start + block - shift, device=device)[None]

            def planning(host):
                plan = real_plan(host)
                if plan.key not in graphs:
                    trace(
                        plan,
                        StepInputs(
                            ids,
                            torch.ones_like(ids),
                            pos,
                            positions,
                            block_rows=positions,
                            rows=plan.rows,
                            span_start=plan.span_start,
                            span_len=plan.span_len,
                        ),
                    )
                return plan

            engine.policy.plan = planning
            engine.step(
                ids,
                None,
                pos,
                positions,
                step=step,
                block_start=start,
                block_end=start + block,
                response_start=prompt,
                mask_token_id=spec.mask_token_id,
                logits_shift=shift,
                last_committed=1,
                last_leftmost=(prompt + step,),
            )
            ids[0, prompt + step] = 4  # one token committed
    return graphs
