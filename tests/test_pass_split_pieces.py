"""Pass 4 (passes/split_pieces.py): the graph cut into pieces that run on a subset of rows."""

from __future__ import annotations

import pytest
import torch

from dyllm_fx.kernels.dispatch import gather_rows
from dyllm_fx.models.layers import (
    apply_rope,
    default_position_ids,
    key_padding_mask,
    rope_cos_sin,
    self_attention,
    swiglu_mlp,
)
from dyllm_fx.passes.capture import capture_module
from dyllm_fx.passes.find_blocks import find_blocks
from dyllm_fx.passes.rewrite_attention import rewrite_attention
from dyllm_fx.passes.split_pieces import split_pieces
from tiny_checkpoints import tiny_llada

B, L = 2, 12
# (B, A) active rows, A < L, different per batch element and not sorted
ROWS = torch.tensor([[9, 0, 4, 3, 11], [2, 5, 6, 11, 7]])


@pytest.fixture(scope="module")
def model():
    return tiny_llada(seed=5)


@pytest.fixture(scope="module")
def captured(model):
    return capture_module(model)


@pytest.fixture(scope="module")
def program(captured):
    return split_pieces(captured, find_blocks(captured.gm))


@pytest.fixture(scope="module")
def inputs(model):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (B, L), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row
    return ids, mask, default_position_ids(ids, mask)


@pytest.fixture(scope="module")
def reference(model, inputs):
    """The original model's per-block inputs and outputs (forward hooks) and its logits."""
    ids, mask, pos = inputs
    h_in, h_out = [], []
    hooks = []
    for block in model.layers:
        hooks.append(block.register_forward_pre_hook(lambda mod, args: h_in.append(args[0].clone())))
        hooks.append(block.register_forward_hook(lambda mod, args, out: h_out.append(out.clone())))
    try:
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=pos)
    finally:
        for h in hooks:
            h.remove()
    return h_in, h_out, logits


def _tables(model, inputs):
    ids, mask, pos = inputs
    cfg = model.config
    cos, sin = rope_cos_sin(pos, cfg.d_model // cfg.n_heads, cfg.rope_theta, torch.float32)
    return cos, sin, key_padding_mask(mask)


def _block_ref(block, x, cos, sin, mask):
    """One LLaDA block by hand: (h_mid, mlp branch)."""
    attn = self_attention(
        block.attn_norm(x),
        block.q_proj,
        block.k_proj,
        block.v_proj,
        block.attn_out,
        block.n_heads,
        block.n_kv_heads,
        cos,
        sin,
        mask,
    )
    h_mid = x + attn
    return h_mid, swiglu_mlp(block.ff_norm(h_mid), block.ff_proj, block.up_proj, block.ff_out)


def _kv_ref(block, x, cos, sin):
    """K (after RoPE) and V of every row, (B, KV, L, d)."""
    bsz, seq, _ = x.shape
    d = block.q_proj.out_features // block.n_heads
    h = block.attn_norm(x)
    k = block.k_proj(h).view(bsz, seq, block.n_kv_heads, d).transpose(1, 2)
    v = block.v_proj(h).view(bsz, seq, block.n_kv_heads, d).transpose(1, 2)
    return apply_rope(k, cos, sin), v


def _pick(x, rows):
    return gather_rows(x, rows, 1)


def test_program_layout(model, program):
    n = model.config.n_layers
    assert len(program.attn) == len(program.mlp) == len(program.blocks) == n
    d = model.config.d_model // model.config.n_heads
    assert program.kv_shapes == [((model.config.kv_heads, d), (model.config.kv_heads, d))] * n
    assert program.hidden_size == model.config.d_model
    assert program.kv_dtype == program.hidden_dtype == torch.float32
    for piece in program.attn:
        names = [p.name for p in piece.gm.graph.nodes if p.op == "placeholder"]
        assert names[:2] == ["h", "rows"] and names[2:] == piece.tables
        assert set(piece.tables) <= set(program.table_names)
    for piece in program.mlp:
        assert [p.name for p in piece.gm.graph.nodes if p.op == "placeholder"] == ["h", "rows"]
        assert piece.tables == []
    # the LM head reads nothing but the final hidden state
    assert program.epilogue.tables == [] and program.epilogue.gathered == []


def test_tables_gathered_and_mask_passed_whole(model, program, inputs):
    ids, mask, pos = inputs
    with torch.no_grad():
        h0, *tables = program.prologue(ids, mask, pos)
    assert len(tables) == len(program.table_names)
    by_name = dict(zip(program.table_names, tables))
    torch.testing.assert_close(h0, model.model.transformer.wte(ids), rtol=0, atol=0)
    cos, sin, key_mask = _tables(model, inputs)
    for piece in program.attn:
        gathered = [by_name[n] for n in piece.gathered]
        whole = [by_name[n] for n in piece.tables if n not in piece.gathered]
        # the RoPE tables (B, 1, L, d) are gathered by row ...
        assert len(gathered) == 2
        assert {t.shape for t in gathered} == {cos.shape}
        assert any(torch.equal(t, cos) for t in gathered) and any(torch.equal(t, sin) for t in gathered)
        # ... the key padding mask is passed whole: every key stays visible to the active queries
        assert len(whole) == 1 and torch.equal(whole[0], key_mask)
        n_gathers = sum(
            1 for n in piece.gm.graph.nodes if n.op == "call_function" and n.target is gather_rows
        )
        assert n_gathers == 2


def test_sizes_rebound_to_active_rows(program):
    for piece in program.attn:
        assert piece.replaced, "the attn piece's view(B, L, H, d) sizes were not re-bound"
        assert all("size of the active rows" in v for v in piece.replaced.values())
        sizes = [n for n in piece.gm.graph.nodes if n.target is torch.ops.aten.sym_size.int]
        assert sizes and all(n.args[0].name == "h" for n in sizes)


def test_dense_pieces_equal_model_intermediates(model, program, inputs, reference):
    ids, mask, pos = inputs
    h_in, h_out, logits = reference
    cos, sin, key_mask = _tables(model, inputs)
    all_rows = torch.arange(L).expand(B, L)
    with torch.no_grad():
        _, *tables = program.prologue(ids, mask, pos)
        by_name = dict(zip(program.table_names, tables))
        h = h_in[0]
        for i, (attn, mlp) in enumerate(zip(program.attn, program.mlp)):
            torch.testing.assert_close(h, h_in[i], rtol=0, atol=1e-6)
            h_mid, ctx = attn.gm(h, all_rows, *(by_name[n] for n in attn.tables))
            want_mid, want_mlp = _block_ref(model.layers[i], h_in[i], cos, sin, key_mask)
            torch.testing.assert_close(h_mid, want_mid, rtol=0, atol=1e-6)
            assert ctx.shape == (B, model.config.n_heads, L, model.config.d_model // model.config.n_heads)
            branch = mlp.gm(h_mid, all_rows)
            torch.testing.assert_close(branch, want_mlp, rtol=0, atol=1e-6)
            h = h_mid + branch
            torch.testing.assert_close(h, h_out[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(program.epilogue.gm(h, all_rows), logits, rtol=0, atol=1e-6)


def test_pieces_run_on_a_subset_of_rows(model, program, inputs, reference):
    """The raw pieces on A < L rows: a block computed on those rows alone (their own K/V,
    their RoPE positions). Exercises the row gathers and the re-bound sizes."""
    ids, mask, pos = inputs
    h_in, _, logits = reference
    cos, sin, key_mask = _tables(model, inputs)
    sub_mask = gather_rows(key_mask, ROWS, 3)  # keys restricted to the subset too
    with torch.no_grad():
        _, *tables = program.prologue(ids, mask, pos)
        by_name = dict(zip(program.table_names, tables))
        for i, (attn, mlp) in enumerate(zip(program.attn, program.mlp)):
            args = [sub_mask if n not in attn.gathered else by_name[n] for n in attn.tables]
            x = _pick(h_in[i], ROWS)
            h_mid, ctx = attn.gm(x, ROWS, *args)
            want_mid, want_mlp = _block_ref(
                model.layers[i], x, gather_rows(cos, ROWS, 2), gather_rows(sin, ROWS, 2), sub_mask
            )
            assert h_mid.shape == (B, ROWS.shape[1], model.config.d_model)
            torch.testing.assert_close(h_mid, want_mid, rtol=0, atol=1e-6)
            torch.testing.assert_close(mlp.gm(h_mid, ROWS), want_mlp, rtol=0, atol=1e-6)
        # the LM head on a subset is the subset of the logits
        h_last = reference[1][-1]  # final norm + LM head are inside the epilogue
        torch.testing.assert_close(
            program.epilogue.gm(_pick(h_last, ROWS), ROWS), _pick(logits, ROWS), rtol=0, atol=1e-6
        )


def test_rewritten_attn_piece_on_subset_equals_rows_of_full_block(model, captured, inputs, reference):
    """With the other rows' K/V in the cache, the piece run on A < L rows gives exactly those
    rows of the full block (attention over every key)."""
    fresh = split_pieces(captured, find_blocks(captured.gm))  # rewrite mutates; keep the shared one raw
    ids, mask, pos = inputs
    h_in, _, _ = reference
    cos, sin, key_mask = _tables(model, inputs)
    with torch.no_grad():
        _, *tables = fresh.prologue(ids, mask, pos)
        by_name = dict(zip(fresh.table_names, tables))
        for i, attn in enumerate(fresh.attn):
            rewrite_attention(attn)
            block = model.layers[i]
            k_full, v_full = _kv_ref(block, h_in[i], cos, sin)
            k_cache, v_cache = k_full.clone(), v_full.clone()
            h_mid, ctx = attn.gm(
                _pick(h_in[i], ROWS), ROWS, *(by_name[n] for n in attn.tables), k_cache, v_cache
            )
            want_mid, _ = _block_ref(block, h_in[i], cos, sin, key_mask)
            torch.testing.assert_close(h_mid, _pick(want_mid, ROWS), rtol=0, atol=1e-6)
            assert ctx.shape[2] == ROWS.shape[1]
            torch.testing.assert_close(k_cache, k_full, rtol=0, atol=1e-6)
            torch.testing.assert_close(v_cache, v_full, rtol=0, atol=1e-6)
