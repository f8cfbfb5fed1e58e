"""Pass 1 of 6: capture one denoising forward as an aten-level FX graph.

``make_fx`` with pre-dispatch tracing keeps ``aten.linear``, ``aten.embedding`` and
``aten.scaled_dot_product_attention`` whole, so later passes match the transformer's
structure from ops and shapes. Sizes are symbolic (the batch and sequence length of
``input_ids``), so every piece cut from the graph runs on any number of rows. Parameters are
closed over, which makes them ``get_attr`` constants that share storage with the model.

The same capture serves a module (``transform()``) and a dynamo graph (the ``dyllm`` backend),
so both go through identical passes.

Models whose step takes more than the three standard inputs (an encoder's K/V cache, a
self-conditioning signal: see ``dyllm_fx.adapters.diffusion_gemma``) are captured with their own
``input_names`` and with ``dynamic`` naming the dims that are symbolic (batch, rows, prefix
lengths); every other dim (heads, head size, vocabulary) is traced as the constant it is, so it
cannot be mistaken for a batch or sequence size of the same value.

Two clean-ups make the graph one the later passes can cut into row pieces:

* in-place ops become out-of-place (``h *= layer_scalar`` on the residual stream would
  otherwise mutate a piece's input);
* ``aten._grouped_mm`` (mixture-of-experts kernels) is traced through ``dyllm::grouped_mm``
  when its fake kernel would refuse the dtype (torch's meta function only takes bfloat16,
  while the CPU kernel also runs float32): the op runs torch's own kernel, so the numbers are
  the untransformed model's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")


@dataclass
class CapturedGraph:
    gm: fx.GraphModule  # placeholders: input_ids, attention_mask, position_ids; returns logits
    batch_symbol: str  # symbolic batch size of input_ids, as printed by sympy
    seq_symbol: str  # symbolic sequence length of input_ids
    param_names: dict[str, str]  # get_attr target -> the parameter's name in the source module
    # names of the graph inputs, in order: input_ids, attention_mask, position_ids, then any
    # extra step inputs the model's step takes (see ``capture(input_names=...)``)
    input_names: tuple[str, ...] = field(default=INPUT_NAMES)


def example_inputs(batch: int = 2, seq_len: int = 17) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with. Only their shapes matter; batch != seq_len keeps the two symbols apart."""
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    pos = torch.arange(seq_len).expand(batch, -1).contiguous()
    return ids, mask, pos


def capture(
    forward: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    named_tensors: dict[str, torch.Tensor] | None = None,
    input_names: Sequence[str] = INPUT_NAMES,
    dynamic: Sequence[Sequence[int]] | None = None,
) -> CapturedGraph:
    """Trace ``forward(input_ids, attention_mask, position_ids, *extras) -> logits`` to an aten graph.

    ``named_tensors`` (name -> parameter) only labels the constants for ``explain()``.
    ``input_names`` names the graph inputs (the first three are always input_ids,
    attention_mask, position_ids). ``dynamic`` gives, per input, the dims traced as symbols
    (inputs of equal size share a symbol, so example sizes must differ where the dims differ);
    None: every dim of every input is symbolic.
    """
    input_names = tuple(input_names)
    if tuple(input_names[:3]) != INPUT_NAMES or len(input_names) != len(inputs):
        raise ValueError(f"input_names must start with {INPUT_NAMES} and name every input; got {input_names}")
    with torch.no_grad(), _trace_safe_ops():
        tracer = make_fx(forward, tracing_mode="symbolic", pre_dispatch=True, _allow_non_fake_inputs=True)
        if dynamic is None:
            gm = tracer(*inputs)
        else:
            fake_inputs, mode = _fake_inputs(inputs, dynamic)
            with mode:
                gm = tracer(*fake_inputs)
    # graph edits only: one lint and one recompile below cover all three
    _functionalize_inplace(gm)
    _expand_sym_numel(gm)
    _drop_noop_conversions(gm)
    gm.graph.lint()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, input_names):
        node.name = node.target = name
    gm.recompile()
    ids_val = placeholders[0].meta["val"]
    batch, seq = str(ids_val.shape[0]), str(ids_val.shape[1])
    if batch.isdigit() or seq.isdigit():
        raise ValueError(
            "the trace fixed the batch or sequence size of input_ids to a constant "
            f"({tuple(ids_val.shape)}): a size "
            "of the example inputs equals another size the model compares it with; trace with other example "
            "sizes"
        )
    by_ptr = {t.data_ptr(): name for name, t in (named_tensors or {}).items()}
    param_names = {
        n.target: by_ptr.get(getattr(gm, n.target).data_ptr(), n.target)
        for n in gm.graph.nodes
        if n.op == "get_attr"
    }
    return CapturedGraph(gm, batch, seq, param_names, input_names)


def _fake_inputs(inputs, dynamic):
    """Fake copies of ``inputs`` whose ``dynamic`` dims are duck-sized symbols and whose other
    dims are static, in a fake mode of their own."""
    from torch._dynamo.source import LocalSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    if len(dynamic) != len(inputs):
        raise ValueError(
            f"dynamic names the symbolic dims of {len(dynamic)} inputs, but there are {len(inputs)}"
        )
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = []
    for i, (t, dims) in enumerate(zip(inputs, dynamic)):
        sizes = [DimDynamic.DUCK if d in tuple(dims) else DimDynamic.STATIC for d in range(t.dim())]
        context = StatelessSymbolicContext(dynamic_sizes=sizes)
        fakes.append(mode.from_tensor(t, source=LocalSource(f"input{i}"), symbolic_context=context))
    return fakes, mode


# --- ops traced through a stand-in ----------------------------------------------------------------


@torch.library.custom_op("dyllm::grouped_mm", mutates_args=())
def grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor | None = None) -> torch.Tensor:
    """``torch._grouped_mm(mat_a, mat_b, offs=offs)``, as one opaque op whose fake kernel takes
    every dtype (torch's own refuses all but bfloat16, although the CPU kernel runs float32)."""
    return _GROUPED_MM(mat_a, mat_b, offs=offs)


@grouped_mm.register_fake
def _(mat_a, mat_b, offs=None):
    if mat_a.dim() == 2 and mat_b.dim() == 3:  # (S, K) x (E, K, N) grouped by offs -> (S, N)
        return mat_a.new_empty(mat_a.shape[0], mat_b.shape[-1])
    if mat_a.dim() == 3 and mat_b.dim() == 3:  # batched
        return mat_a.new_empty(mat_a.shape[0], mat_a.shape[1], mat_b.shape[-1])
    raise NotImplementedError(f"dyllm::grouped_mm of shapes {tuple(mat_a.shape)} x {tuple(mat_b.shape)}")


_GROUPED_MM = getattr(torch, "_grouped_mm", None)


def _grouped_mm_for_trace(mat_a, mat_b, *, offs=None, bias=None, out_dtype=None):
    if mat_a.dtype == torch.bfloat16 or bias is not None or out_dtype not in (None, mat_a.dtype):
        return _GROUPED_MM(mat_a, mat_b, offs=offs, bias=bias, out_dtype=out_dtype)
    return grouped_mm(mat_a, mat_b, offs)


@contextlib.contextmanager
def _trace_safe_ops():
    """While tracing: route ``torch._grouped_mm`` of dtypes its fake kernel refuses to
    :func:`grouped_mm` (``torch.nn.functional.grouped_mm`` calls ``torch._grouped_mm``)."""
    if _GROUPED_MM is None:
        yield
        return
    torch._grouped_mm = _grouped_mm_for_trace
    try:
        yield
    finally:
        torch._grouped_mm = _GROUPED_MM


def _functionalize_inplace(gm: fx.GraphModule) -> None:
    """Rewrite in-place aten ops (``aten.mul_.Tensor`` ...) into their out-of-place forms.

    ``y = x.mul_(s)`` becomes ``y = mul(x, s)``, and every later use of ``x`` reads ``y`` (it
    would have seen the mutated value). A mutated graph input, or a tensor with views that
    outlive the mutation, stays as it is (rare; the pieces' graphs are then left to fail
    loudly where they cannot run).
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        name = schema.name.split("::")[-1]
        if (
            not name.endswith("_")
            or name.startswith("_")
            or not schema.arguments
            or not schema.arguments[0].is_write
        ):
            continue
        packet = getattr(torch.ops.aten, name[:-1], None)
        functional = getattr(packet, node.target._overloadname, None) if packet is not None else None
        target = node.args[0] if node.args else None
        if functional is None or not isinstance(target, fx.Node) or target.op == "placeholder":
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        later = [u for u in target.users if u is not node and order[u] > order[node]]
        if any(_is_view(u) for u in target.users if order[u] < order[node]):
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(functional, node.args, node.kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        for user in later:
            user.replace_input_with(target, new)
        gm.graph.erase_node(node)


def _expand_sym_numel(gm: fx.GraphModule) -> None:
    """``aten.sym_numel(x)`` -> the product of ``aten.sym_size.int(x, d)``: dynamo (the step's
    ``torch.compile``) cannot trace a direct call of an aten op that returns a size, while it
    does trace ``sym_size`` (which the cutter also re-binds to a piece's row count)."""
    import operator

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.sym_numel.default:
            continue
        src = node.args[0]
        ndim = src.meta["val"].dim()
        if ndim == 0:
            continue
        with gm.graph.inserting_before(node):
            total = 1
            for d in range(ndim):
                size = gm.graph.call_function(torch.ops.aten.sym_size.int, (src, d))
                size.meta["val"] = src.meta["val"].shape[d]
                total = size if total == 1 else gm.graph.call_function(operator.mul, (total, size))
                total.meta.setdefault("val", node.meta.get("val"))
        node.replace_all_uses_with(total)
        gm.graph.erase_node(node)


def _is_view(node: fx.Node) -> bool:
    target = node.target
    return (
        isinstance(target, torch._ops.OpOverload)
        and bool(target._schema.returns)
        and (target._schema.returns[0].alias_info is not None)
    )


def _drop_noop_conversions(gm: fx.GraphModule) -> None:
    """Remove ``aten.to`` nodes that change nothing (``x.float()`` on a float32 tensor).

    Pre-dispatch tracing records them as aliases, and later uses of the tensor then read the
    alias; dropping them makes the residual stream one visible chain of adds.
    """
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (
            torch.ops.aten.to.dtype,
            torch.ops.aten.to.dtype_layout,
        ):
            src = node.args[0]
            before, after = src.meta.get("val"), node.meta.get("val")
            if (
                isinstance(before, torch.Tensor)
                and isinstance(after, torch.Tensor)
                and (before.dtype == after.dtype and before.device == after.device)
            ):
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)


def capture_module(model: torch.nn.Module) -> CapturedGraph:
    """Capture a model called as ``model(input_ids, attention_mask=..., position_ids=...)``."""

    def forward(input_ids, attention_mask, position_ids):
        out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return getattr(out, "logits", out)

    device = next(model.parameters()).device
    return capture(forward, tuple(t.to(device) for t in example_inputs()), dict(model.named_parameters()))
