"""The capture clean-ups and the key-prefix recognition that DiffusionGemma needed, each on a
small module of its own: in-place ops made out-of-place, ``torch._grouped_mm`` in float32
through the ``dyllm::grouped_mm`` stand-in, explicit dynamic dims and extra step inputs, and
``attention_operands`` finding an encoder's K/V prefix concatenated in front of the rows' keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyllm_fx.passes.attention_operands import attention_operands
from dyllm_fx.passes.capture import capture, capture_module
from dyllm_fx.passes.matching import SDPA, descendants, is_op


class InPlaceStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.full((8,), 0.5))
        self.head = nn.Linear(8, 10)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        h = self.emb(input_ids)
        h = h + self.lin(h)
        h *= self.scale  # in place on the residual stream, as Gemma's layer scalar
        return self.head(h + 1.0)


def test_inplace_ops_become_out_of_place():
    model = InPlaceStream().eval()
    captured = capture_module(model)
    names = [
        n.target._schema.name
        for n in captured.gm.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
    ]
    assert "aten::mul" in names and not any(name.endswith("_") for name in names)
    ids = torch.randint(0, 10, (3, 5))
    with torch.no_grad():
        assert torch.equal(captured.gm(ids, torch.ones_like(ids), torch.arange(5).expand(3, -1)), model(ids))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
def test_grouped_mm_float32_traces_through_the_stand_in():
    weights = torch.randn(2, 8, 4)
    original = torch._grouped_mm

    def forward(input_ids, attention_mask, position_ids, x):
        offs = torch.tensor([2, x.shape[0]], dtype=torch.int32)  # rows 0-1 to expert 0, the rest to 1
        return torch._grouped_mm(x, weights, offs=offs)

    x = torch.randn(6, 8)
    ids = torch.zeros(2, 3, dtype=torch.long)
    inputs = (ids, torch.ones_like(ids), torch.zeros_like(ids), x)
    captured = capture(
        forward,
        inputs,
        input_names=("input_ids", "attention_mask", "position_ids", "x"),
        dynamic=[(0, 1), (0, 1), (0, 1), ()],
    )
    targets = {n.target for n in captured.gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.dyllm.grouped_mm.default in targets
    out = captured.gm(*inputs)
    assert torch.equal(out, torch._grouped_mm(x, weights, offs=torch.tensor([2, 6], dtype=torch.int32)))
    assert torch._grouped_mm is original  # the stand-in is installed for the trace only
    assert torch.allclose(out[:2], x[:2] @ weights[0]) and torch.allclose(out[2:], x[2:] @ weights[1])


class PrefixAttention(nn.Module):
    """One attention over [an encoder's K/V prefix ; the rows' own K/V], with GQA's repeat."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.head = nn.Linear(16, 10)

    def forward(self, input_ids, attention_mask, position_ids, k_prefix, v_prefix):
        h = self.emb(input_ids)
        b, t, _ = h.shape
        q = self.q(h).view(b, t, 2, 8).transpose(1, 2)
        k = torch.cat([k_prefix, self.k(h).view(b, t, 1, 8).transpose(1, 2)], dim=2).repeat_interleave(
            2, dim=1
        )
        v = torch.cat([v_prefix, self.v(h).view(b, t, 1, 8).transpose(1, 2)], dim=2).repeat_interleave(
            2, dim=1
        )
        ctx = F.scaled_dot_product_attention(q, k, v)
        return self.head(h + ctx.transpose(1, 2).reshape(b, t, 16))


def test_key_prefix_is_recognised():
    model = PrefixAttention().eval()
    ids = torch.zeros(2, 5, dtype=torch.long)
    prefix = torch.randn(2, 1, 7, 8)
    names = ("input_ids", "attention_mask", "position_ids", "k_prefix", "v_prefix")
    captured = capture(
        model,
        (ids, torch.ones_like(ids), torch.zeros_like(ids), prefix, prefix.clone()),
        dict(model.named_parameters()),
        names,
        dynamic=[(0, 1), (0, 1), (0, 1), (0, 2), (0, 2)],
    )
    graph = captured.gm.graph
    h = next(
        n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.embedding.default
    )
    on_rows = descendants(h).__contains__
    ops = attention_operands(next(n for n in graph.nodes if is_op(n, SDPA)), on_rows)
    assert ops.has_prefix
    assert ops.k_prefix.name == "k_prefix" and ops.v_prefix.name == "v_prefix"
    assert on_rows(ops.k_new) and ops.k_new.meta["val"].shape[1] == 1  # the rows' own keys, before the repeat
    # no prefix when what is concatenated in front depends on the rows too
    doubled = attention_operands(next(n for n in graph.nodes if is_op(n, SDPA)), lambda n: True)
    assert not doubled.has_prefix and doubled.k_new is doubled.key
    # the captured graph keeps the prefix length symbolic: another prefix length runs
    ids2 = torch.randint(0, 10, (3, 4))
    p2 = torch.randn(3, 1, 11, 8)
    with torch.no_grad():
        got = captured.gm(ids2, torch.ones_like(ids2), torch.zeros_like(ids2), p2, p2 * 2)
        assert torch.allclose(got, model(ids2, None, None, p2, p2 * 2), atol=1e-6)
