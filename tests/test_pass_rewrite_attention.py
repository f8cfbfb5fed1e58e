"""Pass 6 (passes/rewrite_attention.py): SDPA -> cache writes + partial attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyllm_fx.kernels import dispatch as kernel_ops
from dyllm_fx.kernels.dispatch import gather_rows
from dyllm_fx.models.layers import apply_rope, default_position_ids, rope_cos_sin
from dyllm_fx.passes.capture import capture_module
from dyllm_fx.passes.find_blocks import find_blocks
from dyllm_fx.passes.rewrite_attention import rewrite_attention
from dyllm_fx.passes.split_pieces import PieceError, split_pieces
from tiny_checkpoints import tiny_dream, tiny_llada

SDPA = torch.ops.aten.scaled_dot_product_attention.default
# kernels/dispatch.py's functions: the dyllm:: op (Triton) for CUDA tensors, plain torch otherwise
WRITE = kernel_ops.cache_write_rows
PARTIAL = kernel_ops.partial_attention
B, L = 2, 10
ROWS = torch.tensor([[7, 1, 4], [0, 9, 5]])


@pytest.fixture(scope="module")
def models():
    return {"llada": tiny_llada(seed=7), "dream": tiny_dream(seed=7)}  # dream: GQA, q/k/v biases


@pytest.fixture(scope="module")
def captures(models):
    return {name: capture_module(m) for name, m in models.items()}


def _program(captured, rewrite=True):
    program = split_pieces(captured, find_blocks(captured.gm))
    if rewrite:
        for piece in program.attn:
            rewrite_attention(piece)
    return program


def _inputs(model):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 40, (B, L), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask, default_position_ids(ids, mask)


def _parts(model, name, layer):
    """(norm, k_proj, v_proj, n_kv_heads, head_dim, rope_theta) of a block."""
    block = model.layers[layer]
    if name == "llada":
        cfg = model.config
        return (
            block.attn_norm,
            block.k_proj,
            block.v_proj,
            cfg.kv_heads,
            cfg.d_model // cfg.n_heads,
            cfg.rope_theta,
        )
    cfg = model.config
    a = block.self_attn
    hd = cfg.hidden_size // cfg.num_attention_heads
    return block.input_layernorm, a.k_proj, a.v_proj, cfg.num_key_value_heads, hd, cfg.rope_theta


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_graph_after_rewrite(captures, name):
    program = _program(captures[name])
    for piece in program.attn:
        targets = [n.target for n in piece.gm.graph.nodes if n.op == "call_function"]
        assert SDPA not in targets
        assert targets.count(WRITE) == 2
        assert targets.count(PARTIAL) == 1
        placeholders = [n.name for n in piece.gm.graph.nodes if n.op == "placeholder"]
        assert placeholders[-2:] == ["k_cache", "v_cache"]
        assert placeholders[:2] == ["h", "rows"]
        writes = [n for n in piece.gm.graph.nodes if n.target is WRITE]
        assert [w.args[0].name for w in writes] == ["k_cache", "v_cache"]
        assert all(w.args[1].name == "rows" and w.args[3] == 2 for w in writes)
        partial = next(n for n in piece.gm.graph.nodes if n.target is PARTIAL)
        assert [a.name for a in partial.args[1:4]] == ["k_cache", "v_cache", "rows"]
        # both writes come before the attention that reads the caches
        order = list(piece.gm.graph.nodes)
        assert max(order.index(w) for w in writes) < order.index(partial)
        assert any("partial_attention" in v for v in piece.replaced.values())
    for piece in program.mlp:  # nothing to rewrite there
        assert PARTIAL not in [n.target for n in piece.gm.graph.nodes]


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_piece_writes_active_rows_into_cache(models, captures, name):
    model = models[name]
    program = _program(captures[name])
    ids, mask, pos = _inputs(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        h, *tables = program.prologue(ids, mask, pos)
        by_name = dict(zip(program.table_names, tables))
        for layer, piece in enumerate(program.attn):
            norm, k_proj, v_proj, kv_heads, hd, theta = _parts(model, name, layer)
            k_cache = torch.randn(B, kv_heads, L, hd, generator=gen)  # sentinel contents
            v_cache = torch.randn(B, kv_heads, L, hd, generator=gen)
            k_before, v_before = k_cache.clone(), v_cache.clone()
            x = gather_rows(h, ROWS, 1)
            h_mid, ctx = piece.gm(x, ROWS, *(by_name[n] for n in piece.tables), k_cache, v_cache)
            # direct K/V of the active rows: norm -> projection -> RoPE at their positions
            cos, sin = rope_cos_sin(gather_rows(pos, ROWS, 1), hd, theta, torch.float32)
            hn = norm(x)
            k_want = apply_rope(k_proj(hn).view(B, -1, kv_heads, hd).transpose(1, 2), cos, sin)
            v_want = v_proj(hn).view(B, -1, kv_heads, hd).transpose(1, 2)
            active = torch.zeros(B, L, dtype=torch.bool)
            active[torch.arange(B)[:, None], ROWS] = True
            for b in range(B):
                torch.testing.assert_close(k_cache[b][:, ROWS[b]], k_want[b], rtol=0, atol=1e-6)
                torch.testing.assert_close(v_cache[b][:, ROWS[b]], v_want[b], rtol=0, atol=1e-6)
                assert torch.equal(k_cache[b][:, ~active[b]], k_before[b][:, ~active[b]])
                assert torch.equal(v_cache[b][:, ~active[b]], v_before[b][:, ~active[b]])
            assert h_mid.shape == x.shape
            assert ctx.shape[2] == ROWS.shape[1]
            # the cached rows were read: attention over the cache (not only the active rows)
            ref_ctx = F.scaled_dot_product_attention(
                _queries(model, name, layer, x, cos, sin),
                k_cache,
                v_cache,
                attn_mask=mask.bool()[:, None, None, :],
                enable_gqa=True,
            )
            torch.testing.assert_close(ctx, ref_ctx, rtol=0, atol=1e-6)
            h = torch.randn(h.shape, generator=gen)  # the next layer's input: anything will do


def _queries(model, name, layer, x, cos, sin):
    block = model.layers[layer]
    if name == "llada":
        norm, q_proj, heads = block.attn_norm, block.q_proj, model.config.n_heads
    else:
        norm, q_proj, heads = block.input_layernorm, block.self_attn.q_proj, model.config.num_attention_heads
    q = q_proj(norm(x))
    return apply_rope(q.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2), cos, sin)


class CausalBlockLM(nn.Module):
    """A complete (tiny) decoder block, but with causal attention."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 20)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        x = self.emb(input_ids)
        b, t, _ = x.shape

        def heads(y):
            return y.view(b, t, 2, 8).transpose(1, 2)

        h = F.layer_norm(x, (16,))
        ctx = F.scaled_dot_product_attention(
            heads(self.q(h)), heads(self.k(h)), heads(self.v(h)), is_causal=True
        )
        x = x + self.o(ctx.transpose(1, 2).reshape(b, t, 16))
        x = x + self.down(F.relu(self.up(F.layer_norm(x, (16,)))))
        return self.head(x)


def test_causal_attention_is_rejected():
    program = _program(capture_module(CausalBlockLM().eval()), rewrite=False)
    with pytest.raises(PieceError, match="causal"):
        rewrite_attention(program.attn[0])


def test_causal_or_dropout_flag_on_a_diffusion_model_is_rejected(captures):
    program = _program(captures["llada"], rewrite=False)
    core = next(n for n in program.attn[0].gm.graph.nodes if n.target is SDPA)
    core.kwargs = {**core.kwargs, "is_causal": True}
    with pytest.raises(PieceError, match="causal"):
        rewrite_attention(program.attn[0])
    core = next(n for n in program.attn[1].gm.graph.nodes if n.target is SDPA)
    core.kwargs = {**core.kwargs, "dropout_p": 0.1}
    with pytest.raises(PieceError, match="dropout"):
        rewrite_attention(program.attn[1])


def test_piece_without_attention_is_rejected(captures):
    program = _program(captures["llada"], rewrite=False)
    with pytest.raises(PieceError, match="one attention core, found 0"):
        rewrite_attention(program.mlp[0])
