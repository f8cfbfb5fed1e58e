"""Pass 3 (passes/find_blocks.py): transformer blocks recognised from the graph's structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyllm_fx.models.hf import bidirectional
from dyllm_fx.passes.capture import capture_module
from dyllm_fx.passes.find_blocks import BlockMatchError, find_blocks
from tiny_checkpoints import tiny_dream, tiny_llada


def _hf(kind: str):
    transformers = pytest.importorskip("transformers")
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    cfg = cfg_cls(
        vocab_size=50,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return bidirectional(model_cls(cfg).eval(), mask_token_id=1)


_HF_NAMES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}

# per architecture: (builder, n_layers, prefix of block i, module names inside a block)
CASES = {
    "llada": (
        lambda: tiny_llada(seed=1, n_layers=3),
        3,
        "model.transformer.blocks.{i}.",
        {
            "q": "q_proj",
            "k": "k_proj",
            "v": "v_proj",
            "o": "attn_out",
            "mlp": ["ff_proj", "up_proj", "ff_out"],
        },
    ),
    "dream": (
        lambda: tiny_dream(seed=1),
        2,
        "model.layers.{i}.",
        _HF_NAMES,
    ),
    "hf-llama": (lambda: _hf("llama"), 2, "model.model.layers.{i}.", _HF_NAMES),
    "hf-qwen2": (lambda: _hf("qwen2"), 2, "model.model.layers.{i}.", _HF_NAMES),
}


def _weight_name(captured, linear) -> str:
    return captured.param_names[linear.args[1].target].removesuffix(".weight")


@pytest.mark.parametrize("arch", list(CASES))
def test_blocks_and_their_linears(arch):
    build, n_layers, prefix, names = CASES[arch]
    captured = capture_module(build())
    blocks = find_blocks(captured.gm)
    assert len(blocks) == n_layers
    for i, b in enumerate(blocks):
        p = prefix.format(i=i)
        assert b.index == i
        assert _weight_name(captured, b.q_proj) == p + names["q"]
        assert _weight_name(captured, b.k_proj) == p + names["k"]
        assert _weight_name(captured, b.v_proj) == p + names["v"]
        assert _weight_name(captured, b.o_proj) == p + names["o"]
        # the MLP linears in graph order (gate, up, down for SwiGLU)
        assert [_weight_name(captured, n) for n in b.mlp_linears] == [p + n for n in names["mlp"]]
        assert b.attention.target is torch.ops.aten.scaled_dot_product_attention.default
        # the residual stream is one chain: block i's output is block i+1's input
        if i:
            assert b.h_in is blocks[i - 1].h_out
        assert b.h_mid in b.h_out.args[:2] and b.mlp_out in b.h_out.args[:2]


class MLPOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 20)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        x = self.emb(input_ids)
        x = x + self.down(F.gelu(self.up(x)))
        return self.head(x)


class NoResidualAttention(nn.Module):
    """embedding -> q, k, v -> SDPA -> o -> LM head, with nothing added back."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, 20)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        x = self.emb(input_ids)
        b, t, _ = x.shape

        def heads(y):
            return y.view(b, t, 2, 8).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.head(self.o(ctx.transpose(1, 2).reshape(b, t, 16)))


def test_model_without_attention_is_rejected():
    captured = capture_module(MLPOnly().eval())
    with pytest.raises(BlockMatchError, match="scaled_dot_product_attention"):
        find_blocks(captured.gm)


def test_attention_without_residual_is_rejected():
    captured = capture_module(NoResidualAttention().eval())
    core = next(
        n for n in captured.gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default
    )
    with pytest.raises(BlockMatchError) as err:
        find_blocks(captured.gm)
    msg = str(err.value)
    assert "block 0" in msg and f"'{core.name}'" in msg
    assert "residual" in msg


class TwoBlocks(nn.Module):
    """Two pre-norm-free blocks; between them the residual stream is scaled per feature
    (``between="scale"``, Gemma's layer scalar: matches) or gets a per-position table added
    (``between="positions"``: rejected, a piece on gathered rows could not compute it)."""

    def __init__(self, between: str):
        super().__init__()
        self.between = between
        self.emb = nn.Embedding(20, 16)
        self.attn = nn.ModuleList(
            nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(4)) for _ in range(2)
        )
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16)) for _ in range(2)
        )
        self.scale = nn.Parameter(torch.full((16,), 0.5))
        self.register_buffer("table", torch.randn(64, 16))
        self.head = nn.Linear(16, 20, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        h = self.emb(input_ids)
        b, t, _ = h.shape
        for i in range(2):
            q, k, v, o = self.attn[i]

            def heads(y):
                return y.view(b, t, 2, 8).transpose(1, 2)

            ctx = F.scaled_dot_product_attention(heads(q(h)), heads(k(h)), heads(v(h)))
            h = h + o(ctx.transpose(1, 2).reshape(b, t, 16))
            h = h + self.mlp[i](h)
            if i == 0:
                h = h * self.scale if self.between == "scale" else h + self.table[:t]
        return self.head(h)


def test_row_wise_ops_between_blocks():
    captured = capture_module(TwoBlocks("scale").eval())
    first, second = find_blocks(captured.gm)
    assert second.stream_in is first.h_out and second.h_in is not first.h_out  # cut before the scale
    assert second.h_in.target is torch.ops.aten.mul.Tensor
    with pytest.raises(BlockMatchError, match="row-wise ops with constants"):
        find_blocks(capture_module(TwoBlocks("positions").eval()).gm)
