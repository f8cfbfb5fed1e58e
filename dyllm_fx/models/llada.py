"""LLaDA (GSAI-ML/LLaDA-8B-Base / -Instruct), written from the published architecture.

An OLMo-style stack run bidirectionally: RMSNorm, SwiGLU, RoPE, no biases. Module names
reproduce the published checkpoint's state-dict keys, so its safetensors load unchanged:

    model.transformer.wte.weight
    model.transformer.blocks.{i}.{attn_norm,ff_norm}.weight
    model.transformer.blocks.{i}.{q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out}.weight
    model.transformer.ln_f.weight
    model.transformer.ff_out.weight          (absent when weight_tying is true)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .config_fields import ConfigReader
from .layers import BidirectionalLM, LMParts, RMSNorm, self_attention, swiglu_mlp

LLADA_MASK_TOKEN_ID = 126336


@dataclass
class LLaDAConfig:
    """The config.json fields of a LLaDA checkpoint that define the network."""

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None
    n_layers: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int | None = None
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    include_bias: bool = False
    include_qkv_bias: bool = False
    weight_tying: bool = False
    mask_token_id: int = LLADA_MASK_TOKEN_ID
    eos_token_id: int = 126081
    pad_token_id: int = 126081

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "LLaDAConfig":
        """The config of ``raw`` (config.json's content, read from ``source``), every setting
        checked; a CheckpointError names the file and the key that is wrong."""
        read = ConfigReader(source)
        cfg = cls(**read.fields(cls, raw))
        read.positive(cfg, "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size")
        read.positive(
            cfg, "vocab_size", "embedding_size", "max_sequence_length", "rope_theta", "rms_norm_eps"
        )
        read.divides(cfg, "n_heads", "d_model")
        if cfg.n_kv_heads is not None:
            read.divides(cfg, "n_kv_heads", "n_heads")
        vocab_key = "vocab_size" if cfg.embedding_size is None else "embedding_size"
        read.token_ids(cfg, vocab_key, cfg.padded_vocab, "mask_token_id", "eos_token_id", "pad_token_id")
        unsupported = {k: raw[k] for k in ("attention_layer_norm", "alibi", "clip_qkv") if raw.get(k)}
        if raw.get("activation_type", "silu") not in ("silu", "swiglu"):
            unsupported["activation_type"] = raw["activation_type"]
        if unsupported:
            raise ValueError(
                f"LLaDA config uses features dyllm-fx does not implement: {unsupported}. "
                "Only the published LLaDA-8B layout (RMSNorm, SwiGLU, RoPE) is supported."
            )
        return cfg

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def padded_vocab(self) -> int:
        return self.embedding_size or self.vocab_size


class LLaDABlock(nn.Module):
    """One bidirectional transformer block (OLMo `LLaDALlamaBlock` layout)."""

    # tensor parallel (passes/tensor_parallel.py): heads and the MLP split over the ranks
    tp_plan = {
        "q_proj": "colwise",
        "k_proj": "colwise",
        "v_proj": "colwise",
        "attn_out": "rowwise",
        "ff_proj": "colwise",
        "up_proj": "colwise",
        "ff_out": "rowwise",
    }
    tp_heads = ("n_heads", "n_kv_heads")

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        head_dim = cfg.d_model // cfg.n_heads
        qkv_bias = cfg.include_bias or cfg.include_qkv_bias
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(cfg.n_heads * head_dim, cfg.d_model, bias=cfg.include_bias)
        self.ff_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=cfg.include_bias)  # gate
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=cfg.include_bias)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=cfg.include_bias)

    def forward(self, x, cos, sin, mask):
        h = self.attn_norm(x)
        x = x + self_attention(
            h,
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.attn_out,
            self.n_heads,
            self.n_kv_heads,
            cos,
            sin,
            mask,
        )
        return x + swiglu_mlp(self.ff_norm(x), self.ff_proj, self.up_proj, self.ff_out)


class _LLaDATransformer(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        modules = {
            "wte": nn.Embedding(cfg.padded_vocab, cfg.d_model),
            "blocks": nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers)),
            "ln_f": RMSNorm(cfg.d_model, cfg.rms_norm_eps),
        }
        if not cfg.weight_tying:
            modules["ff_out"] = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=cfg.include_bias)
        self.transformer = nn.ModuleDict(modules)


class LLaDAModelLM(BidirectionalLM):
    """LLaDA masked diffusion LM. ``forward`` returns logits (B, T, embedding_size)."""

    architecture = "llada"

    def __init__(self, cfg: LLaDAConfig):
        super().__init__(cfg, logits_shift=0, max_length=cfg.max_sequence_length)
        self.model = _LLaDATransformer(cfg)

    def parts(self) -> LMParts:
        t, cfg = self.model.transformer, self.config
        head = None if cfg.weight_tying else t.ff_out
        return LMParts(t.wte, t.blocks, t.ln_f, head, cfg.d_model // cfg.n_heads, cfg.rope_theta)
