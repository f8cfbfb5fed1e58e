"""Pass 5 (passes/split_attention.py): an attention piece cut at its core into query / kv / post."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dyllm_fx.models.layers import default_position_ids
from dyllm_fx.passes.capture import capture_module
from dyllm_fx.passes.find_blocks import find_blocks
from dyllm_fx.passes.matching import LINEAR, SDPA, is_op
from dyllm_fx.passes.split_attention import split_attention
from dyllm_fx.passes.split_pieces import split_pieces
from tiny_checkpoints import tiny_dream, tiny_llada

B, L = 2, 10


@pytest.fixture(scope="module", params=["llada", "dream"])
def program(request):
    model = tiny_llada(seed=3) if request.param == "llada" else tiny_dream(seed=3)
    captured = capture_module(model)
    return model, split_pieces(captured, find_blocks(captured.gm))


def _inputs(model):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (B, L), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask, default_position_ids(ids, mask)


def test_parts_recompose_the_piece_on_a_row_subset(program):
    """post(h, SDPA(query, kv over all rows)) equals the uncut piece, with queries on a subset."""
    model, prog = program
    ids, mask, pos = _inputs(model)
    with torch.no_grad():
        h0, *tables = prog.prologue(ids, mask, pos)
        piece = prog.attn[0]
        parts = split_attention(piece)
        piece_tables = [tables[prog.table_names.index(n)] for n in piece.tables]
        all_rows = torch.arange(L).expand(B, -1)
        want, want_ctx = piece.gm(h0, all_rows, *piece_tables)

        rows = torch.tensor([[7, 2, 9], [4, 8, 3]])
        h_sub = h0.gather(1, rows[..., None].expand(-1, -1, h0.shape[-1]))
        q, attn_mask = parts.query(h_sub, rows, *piece_tables)
        k, v = parts.kv(h0, all_rows, *piece_tables)
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, enable_gqa=q.shape[1] != k.shape[1]
        )
        got = parts.post(h_sub, ctx)
    torch.testing.assert_close(
        ctx, want_ctx.gather(2, rows[:, None, :, None].expand(-1, ctx.shape[1], -1, ctx.shape[-1]))
    )
    torch.testing.assert_close(got, want.gather(1, rows[..., None].expand(-1, -1, want.shape[-1])))


def test_each_part_keeps_only_its_branch_and_shares_the_weights(program):
    model, prog = program
    parts = split_attention(prog.attn[0])
    n_linear = {
        name: sum(is_op(n, LINEAR) for n in gm.graph.nodes)
        for name, gm in (("query", parts.query), ("kv", parts.kv), ("post", parts.post))
    }
    assert n_linear == {"query": 1, "kv": 2, "post": 1}
    for gm in (parts.query, parts.kv, parts.post):
        assert not any(is_op(n, SDPA) for n in gm.graph.nodes)
    original = {id(p) for p in prog.attn[0].gm.parameters()}
    assert all(len(list(gm.parameters())) >= 1 for gm in (parts.query, parts.kv, parts.post))
    assert all(id(p) in original for gm in (parts.query, parts.kv, parts.post) for p in gm.parameters())
    assert [n.name for n in parts.post.graph.nodes if n.op == "placeholder"] == ["h", "context"]
