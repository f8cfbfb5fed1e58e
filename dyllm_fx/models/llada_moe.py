"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base / -Instruct), written from the published
architecture (its ``modeling_lladamoe.py``, ``model_type: lladamoe``).

An OLMoE-style stack run bidirectionally: RMSNorm, RoPE, per-head RMSNorm on queries and keys
(``qk_layernorm``), and a sparse mixture of experts in place of the MLP: a linear router, a
softmax over all experts (plus an optional expert bias), the top ``num_experts_per_tok``
probabilities used as they are (the published block never renormalises them, whatever
``norm_topk_prob`` says), SwiGLU experts. Layers whose ``moe_layer_freq`` entry is 0 keep a
dense SwiGLU MLP; ``shared_expert_intermediate_size`` adds a shared expert beside the routed
ones. Checkpoint keys:

    model.embed_tokens.weight
    model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight
    model.layers.{i}.self_attn.{q_proj,k_proj,v_proj,o_proj}.weight   (+ .bias with attention_bias)
    model.layers.{i}.self_attn.{q_norm,k_norm}.weight                 (head_dim each)
    model.layers.{i}.mlp.gate.weight                                  (router: experts x hidden)
    model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight
    model.layers.{i}.mlp.expert_bias                                  (with moe_router_enable_expert_bias)
    model.layers.{i}.shared_expert.{gate_proj,up_proj,down_proj}.weight
    model.layers.{i}.mlp.{gate_proj,up_proj,down_proj}.weight         (dense layers)
    model.norm.weight
    lm_head.weight                                                    (absent when tied)

The experts are held stacked, one (experts, out, in) tensor per projection, so that the step
reads each expert's weights once whatever the number of rows; loading and saving translate
from and to the per-expert keys above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config_fields import ConfigReader
from .layers import HF_BLOCK_TP_PLAN, BidirectionalLM, LMParts, RMSNorm, self_attention, swiglu_mlp

# The model card's <|mask|> and <|endoftext|>; the published config.json does not name them.
LLADA_MOE_MASK_TOKEN_ID = 156895
LLADA_MOE_EOS_TOKEN_ID = 156892


@dataclass
class LLaDAMoEConfig:
    """The config.json fields of a LLaDA-MoE checkpoint that define the network."""

    hidden_size: int = 2048
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    num_hidden_layers: int = 16
    vocab_size: int = 157184
    dense_intermediate_size: int = 8192
    expert_intermediate_size: int = 1024
    shared_expert_intermediate_size: int | None = None
    num_experts: int = 64
    num_experts_per_tok: int = 8
    moe_layer_freq: list[int] | None = None  # None: every layer is a MoE layer
    moe_router_enable_expert_bias: bool = False
    qk_layernorm: bool = True
    attention_bias: bool = False
    max_position_embeddings: int = 8192
    rope_theta: float = 50000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    mask_token_id: int = LLADA_MOE_MASK_TOKEN_ID
    eos_token_id: int = LLADA_MOE_EOS_TOKEN_ID
    pad_token_id: int = LLADA_MOE_EOS_TOKEN_ID

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "LLaDAMoEConfig":
        """The config of ``raw`` (config.json's content, read from ``source``), every setting
        checked; a CheckpointError names the file and the key that is wrong."""
        read = ConfigReader(source)
        unsupported = {k: raw[k] for k in ("clip_qkv", "rope_scaling") if raw.get(k)}
        if raw.get("hidden_act", "silu") != "silu":
            unsupported["hidden_act"] = raw["hidden_act"]
        if raw.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
            unsupported["partial_rotary_factor"] = raw["partial_rotary_factor"]
        if unsupported:
            raise read.fail(
                f"LLaDA-MoE config uses features dyllm-fx does not implement: {unsupported} (only the "
                "published layout: SwiGLU experts, full-width plain RoPE)"
            )
        cfg = cls(**read.fields(cls, raw))
        read.positive(cfg, "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
        read.positive(cfg, "vocab_size", "dense_intermediate_size", "expert_intermediate_size")
        read.positive(cfg, "shared_expert_intermediate_size", "num_experts", "num_experts_per_tok")
        read.positive(cfg, "max_position_embeddings", "rope_theta", "rms_norm_eps")
        read.divides(cfg, "num_attention_heads", "hidden_size")
        if cfg.num_key_value_heads is not None:
            read.divides(cfg, "num_key_value_heads", "num_attention_heads")
        if cfg.num_experts_per_tok > cfg.num_experts:
            raise read.fail(
                f"num_experts_per_tok={cfg.num_experts_per_tok} must be in 1..num_experts ({cfg.num_experts})"
            )
        freq = cfg.moe_layer_freq
        if freq is not None and (
            not isinstance(freq, list)
            or len(freq) != cfg.num_hidden_layers
            or any(v not in (0, 1) or isinstance(v, float) for v in freq)
        ):
            raise read.fail(
                f"moe_layer_freq must list one 0 (dense) or 1 (experts) per layer, {cfg.num_hidden_layers} "
                f"entries; got {freq!r}"
            )
        read.token_ids(cfg, "vocab_size", cfg.vocab_size, "mask_token_id", "eos_token_id", "pad_token_id")
        return cfg

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, index: int) -> bool:
        return self.moe_layer_freq is None or bool(self.moe_layer_freq[index])


_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class SparseMoE(nn.Module):
    """Router + routed SwiGLU experts, evaluated densely: every expert runs on every row it is
    given and the router's top-k probabilities (zero elsewhere) weight the sum.

    Dense evaluation keeps the step's shapes static and row-wise (the compiler runs this piece
    on whichever rows a policy recomputes, captures it whole and exports it) and reads each
    expert's weights once per step; it does ``num_experts / num_experts_per_tok`` times the
    arithmetic of routed dispatch, which a grouped-GEMM kernel would remove."""

    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__()
        e, i, d = cfg.num_experts, cfg.expert_intermediate_size, cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(d, e, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(e, i, d))
        self.up_proj = nn.Parameter(torch.empty(e, i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        if cfg.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(e))
        else:
            self.expert_bias = None
        self.reduce = None  # tensor parallel: the sum over the ranks of the partial outputs
        self.register_load_state_dict_pre_hook(_stack_expert_keys)
        self.register_state_dict_post_hook(_unstack_expert_keys)

    # tensor parallel (passes/tensor_parallel.py): each parameter's dim of every expert's
    # intermediate features, split over the ranks; the router stays whole and ``reduce`` sums
    # the partial outputs
    tp_split = {"gate_proj": 1, "up_proj": 1, "down_proj": 2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        if self.expert_bias is not None:
            probs = probs + self.expert_bias
        top, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, chosen, top).to(x.dtype)  # (..., experts)
        gate = torch.einsum("...d,eid->...ei", x, self.gate_proj)
        up = torch.einsum("...d,eid->...ei", x, self.up_proj)
        out = torch.einsum("...ei,edi->...ed", F.silu(gate) * up, self.down_proj)
        out = torch.einsum("...e,...ed->...d", weights, out)
        return out if self.reduce is None else self.reduce(out)


def _stack_expert_keys(module, state, prefix, *args) -> None:
    """Checkpoint keys ``experts.{e}.gate_proj.weight`` -> the stacked ``gate_proj`` tensor."""
    count = module.gate_proj.shape[0]
    for name in _PROJECTIONS:
        keys = [f"{prefix}experts.{e}.{name}.weight" for e in range(count)]
        if all(k in state for k in keys):
            state[prefix + name] = torch.stack([state.pop(k) for k in keys])


def _unstack_expert_keys(module, state, prefix, local_metadata) -> None:
    """The stacked tensors -> the checkpoint's per-expert keys (what save and checks compare)."""
    for name in _PROJECTIONS:
        stacked = state.pop(prefix + name)
        for e in range(stacked.shape[0]):
            state[f"{prefix}experts.{e}.{name}.weight"] = stacked[e]


def _dense_mlp(hidden: int, intermediate: int) -> nn.Module:
    mlp = nn.Module()
    mlp.gate_proj = nn.Linear(hidden, intermediate, bias=False)
    mlp.up_proj = nn.Linear(hidden, intermediate, bias=False)
    mlp.down_proj = nn.Linear(intermediate, hidden, bias=False)
    return mlp


def _swiglu(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return swiglu_mlp(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj)


class LLaDAMoEBlock(nn.Module):
    """One bidirectional decoder layer: attention with per-head QK norm, then the (sparse) MLP."""

    # tensor parallel (passes/tensor_parallel.py): heads, the dense MLPs and every expert's
    # intermediate features split over the ranks; the router stays whole on every rank
    tp_plan = {
        **HF_BLOCK_TP_PLAN,  # the dense layers' MLP is mlp.{gate,up,down}_proj
        "shared_expert.gate_proj": "colwise",
        "shared_expert.up_proj": "colwise",
        "shared_expert.down_proj": "rowwise",
        "mlp": "experts",
    }
    tp_heads = ("n_heads", "n_kv_heads")

    def __init__(self, cfg: LLaDAMoEConfig, index: int):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.kv_heads
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        attn = nn.Module()
        attn.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.attention_bias)
        attn.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.attention_bias)
        attn.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.attention_bias)
        attn.o_proj = nn.Linear(d, d, bias=cfg.attention_bias)
        if cfg.qk_layernorm:
            attn.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            attn.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.self_attn = attn
        moe = cfg.is_moe_layer(index)
        self.mlp = SparseMoE(cfg) if moe else _dense_mlp(d, cfg.dense_intermediate_size)
        self.moe = moe
        if moe and cfg.shared_expert_intermediate_size is not None:
            self.shared_expert = _dense_mlp(d, cfg.shared_expert_intermediate_size)
        else:
            self.shared_expert = None

    def forward(self, x, cos, sin, mask):
        a = self.self_attn
        norms = (a.q_norm, a.k_norm) if hasattr(a, "q_norm") else (None, None)
        h = self.input_layernorm(x)
        x = x + self_attention(
            h, a.q_proj, a.k_proj, a.v_proj, a.o_proj, self.n_heads, self.n_kv_heads, cos, sin, mask, *norms
        )
        h = self.post_attention_layernorm(x)
        out = self.mlp(h) if self.moe else _swiglu(self.mlp, h)
        if self.shared_expert is not None:
            out = out + _swiglu(self.shared_expert, h)
        return x + out


class _LLaDAMoEBackbone(nn.Module):
    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LLaDAMoEBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLaDAMoEModelLM(BidirectionalLM):
    """LLaDA-MoE masked diffusion LM (LLaDA's conventions: no logit shift, LLaDA's sampler).
    ``forward`` returns logits (B, T, vocab)."""

    architecture = "llada_moe"

    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__(cfg, logits_shift=0, max_length=cfg.max_position_embeddings)
        self.model = _LLaDAMoEBackbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def parts(self) -> LMParts:
        m, cfg = self.model, self.config
        head = None if cfg.tie_word_embeddings else self.lm_head
        return LMParts(m.embed_tokens, m.layers, m.norm, head, cfg.head_dim, cfg.rope_theta)
