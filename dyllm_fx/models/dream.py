"""Dream (Dream-org/Dream-v0-Base-7B / -Instruct-7B), written from the published architecture.
The Dream family shares it: DiffuCoder (apple/DiffuCoder-7B-Base / -Instruct / -cpGRPO) and
Dream-Coder (Dream-org/Dream-Coder-v0-Base-7B / -Instruct-7B) publish the same
``model_type: Dream`` / ``DreamModel`` config and keys; their own decoding settings and chat
templates come from their folders (``models/generation_config.py``, the tokenizer files).

A Qwen2 stack (q/k/v biases, grouped-query attention, RMSNorm, SwiGLU, RoPE) run
bidirectionally. Dream was initialised from an autoregressive model and keeps its shift: the
logits for position i are read at position i - 1 (``DiffusionSpec.logits_shift = 1``); the
runtime applies it. State-dict keys are the Qwen2 ones:

    model.embed_tokens.weight
    model.layers.{i}.self_attn.{q_proj,k_proj,v_proj}.{weight,bias}
    model.layers.{i}.self_attn.o_proj.weight
    model.layers.{i}.mlp.{gate_proj,up_proj,down_proj}.weight
    model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight
    model.norm.weight
    lm_head.weight                            (absent when tie_word_embeddings is true)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .config_fields import ConfigReader
from .layers import HF_BLOCK_TP_PLAN, BidirectionalLM, LMParts, RMSNorm, self_attention, swiglu_mlp


@dataclass
class DreamConfig:
    """The config.json fields of a Dream checkpoint that define the network."""

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vocab_size: int = 152064
    max_position_embeddings: int = 131072
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    mask_token_id: int = 151666
    eos_token_id: int = 151643
    pad_token_id: int = 151643

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "DreamConfig":
        """The config of ``raw`` (config.json's content, read from ``source``), every setting
        checked; a CheckpointError names the file and the key that is wrong."""
        if raw.get("rope_scaling"):
            raise ValueError(
                f"Dream config sets rope_scaling={raw['rope_scaling']!r}; dyllm-fx implements plain RoPE "
                "only. Remove rope_scaling from config.json or use a checkpoint without it."
            )
        if raw.get("use_sliding_window"):
            raise ValueError(
                "Dream config sets use_sliding_window=true; dyllm-fx runs full bidirectional attention "
                "only (every published Dream, DiffuCoder and Dream-Coder checkpoint sets it false). "
                "Set it to false in config.json."
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"Dream config sets hidden_act={raw['hidden_act']!r}; dyllm-fx implements Qwen2's SwiGLU "
                "MLP (hidden_act 'silu') only"
            )
        if "mask_token_id" not in raw:
            raise ValueError(
                "Dream config.json has no mask_token_id; add it (151666 for Dream-v0 checkpoints)."
            )
        read = ConfigReader(source)
        cfg = cls(**read.fields(cls, raw))
        read.positive(cfg, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        read.positive(cfg, "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta")
        read.positive(cfg, "rms_norm_eps")
        read.divides(cfg, "num_attention_heads", "hidden_size")
        read.divides(cfg, "num_key_value_heads", "num_attention_heads")
        read.token_ids(cfg, "vocab_size", cfg.vocab_size, "mask_token_id", "eos_token_id", "pad_token_id")
        return cfg


class DreamBlock(nn.Module):
    """Qwen2 decoder layer without the causal mask."""

    tp_plan = HF_BLOCK_TP_PLAN  # tensor parallel: heads and the MLP split over the ranks
    tp_heads = ("n_heads", "n_kv_heads")

    def __init__(self, cfg: DreamConfig):
        super().__init__()
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * head_dim, bias=True)
        self.self_attn.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * head_dim, bias=True)
        self.self_attn.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * head_dim, bias=True)
        self.self_attn.o_proj = nn.Linear(self.n_heads * head_dim, cfg.hidden_size, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask):
        a = self.self_attn
        h = self.input_layernorm(x)
        x = x + self_attention(
            h, a.q_proj, a.k_proj, a.v_proj, a.o_proj, self.n_heads, self.n_kv_heads, cos, sin, mask
        )
        m = self.mlp
        return x + swiglu_mlp(self.post_attention_layernorm(x), m.gate_proj, m.up_proj, m.down_proj)


class _DreamBackbone(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DreamBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DreamModel(BidirectionalLM):
    """Dream masked diffusion LM. ``forward`` returns unshifted logits (B, T, vocab)."""

    architecture = "dream"

    def __init__(self, cfg: DreamConfig):
        super().__init__(cfg, logits_shift=1, max_length=cfg.max_position_embeddings)
        self.model = _DreamBackbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def parts(self) -> LMParts:
        m, cfg = self.model, self.config
        head = None if cfg.tie_word_embeddings else self.lm_head
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        return LMParts(m.embed_tokens, m.layers, m.norm, head, head_dim, cfg.rope_theta)
