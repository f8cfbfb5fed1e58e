"""LLaDA2 (inclusionAI/LLaDA2.0-mini and -flash, ``model_type: llada2_moe``, the BailingMoeV2
layout), written from the published ``modeling_llada2_moe.py`` and ``configuration_llada2_moe.py``.

A block-diffusion LM: the sequence is cut into blocks of ``block_length`` positions (32 for the
published models) counted from the first token; a query attends to every key of its own block and
of the blocks before it, none after. So the keys of finished blocks never change while a later
block is denoised: their K/V is exact, not an approximation.

Each layer: RMSNorm, a fused query/key/value projection, per-head RMSNorm on queries and keys,
RoPE on the first ``partial_rotary_factor`` of each head only, attention, the output projection
``dense``; then RMSNorm and either a dense SwiGLU MLP (the first ``first_k_dense_replace`` layers)
or a mixture of experts: a sigmoid router in fp32 whose scores plus an expert bias choose, first
the ``topk_group`` best of ``n_group`` expert groups (a group scores the sum of its two best
experts), then the ``num_experts_per_tok`` best experts inside those groups; the chosen experts'
*unbiased* scores, renormalised to sum to 1 and times ``routed_scaling_factor``, weight their
outputs; ``num_shared_experts`` adds an always-on SwiGLU of ``moe_intermediate_size`` times that
many features. Checkpoint keys:

    model.word_embeddings.weight
    model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight
    model.layers.{i}.attention.query_key_value.weight        (+ .bias with use_qkv_bias)
    model.layers.{i}.attention.{query_layernorm,key_layernorm}.weight   (head_dim each)
    model.layers.{i}.attention.dense.weight                  (+ .bias with use_bias)
    model.layers.{i}.mlp.{gate_proj,up_proj,down_proj}.weight                   (dense layers)
    model.layers.{i}.mlp.gate.weight, model.layers.{i}.mlp.gate.expert_bias     (router)
    model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight
    model.layers.{i}.mlp.shared_experts.{gate_proj,up_proj,down_proj}.weight
    model.norm.weight
    lm_head.weight

The fused projection is held as three linears (the compiler finds a block's queries, keys and
values as three projections) and the experts stacked, one (experts, out, in) tensor per
projection (each expert's weights read once per step); loading and saving translate from and to
the keys above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config_fields import ConfigReader
from .layers import BidirectionalLM, LMParts, RMSNorm, self_attention, swiglu_mlp
from .llada_moe import _dense_mlp, _stack_expert_keys, _unstack_expert_keys

# The defaults of the published generate(): <|mask|>, <|endoftext|> and the block length the
# models were trained with; the published config.json names none of them.
LLADA2_MASK_TOKEN_ID = 156895
LLADA2_EOS_TOKEN_ID = 156892
LLADA2_BLOCK_LENGTH = 32


@dataclass
class LLaDA2Config:
    """The config.json fields of a LLaDA2 checkpoint that define the network. A key absent from
    config.json takes the published configuration class's default (``use_bias`` true: the
    attention output projection has a bias unless config.json says otherwise)."""

    hidden_size: int = 1024
    num_attention_heads: int = 16
    num_key_value_heads: int = 0  # the published default, refused: every checkpoint sets it
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    num_hidden_layers: int = 24
    vocab_size: int = 30592
    intermediate_size: int | None = None  # the dense layers' MLP width
    moe_intermediate_size: int | None = None  # each expert's width
    num_experts: int = 16
    num_shared_experts: int = 0
    num_experts_per_tok: int = 2
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 0
    partial_rotary_factor: float = 0.5
    use_qkv_bias: bool = False
    use_bias: bool = True
    use_qk_norm: bool = True
    max_position_embeddings: int = 16384
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    mask_token_id: int = LLADA2_MASK_TOKEN_ID
    eos_token_id: int = LLADA2_EOS_TOKEN_ID
    pad_token_id: int = LLADA2_EOS_TOKEN_ID
    block_length: int = LLADA2_BLOCK_LENGTH

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "LLaDA2Config":
        """The config of ``raw`` (config.json's content, read from ``source``), every setting
        checked; a CheckpointError names the file and the key that is wrong."""
        read = ConfigReader(source)
        unsupported = {k: raw[k] for k in ("rope_scaling", "norm_head") if raw.get(k)}
        for key, published in (("hidden_act", "silu"), ("score_function", "sigmoid")):
            if raw.get(key, published) != published:
                unsupported[key] = raw[key]
        if raw.get("use_qk_norm") is False:
            unsupported["use_qk_norm"] = False  # the published attention norms q and k always
        if unsupported:
            raise read.fail(
                f"LLaDA2 config uses features dyllm-fx does not implement: {unsupported} (only the "
                "published layout: SwiGLU, sigmoid router, QK norm, plain partial RoPE)"
            )
        cfg = cls(**read.fields(cls, raw))
        read.positive(cfg, "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
        read.positive(cfg, "head_dim", "vocab_size", "moe_intermediate_size", "num_experts")
        read.positive(cfg, "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor")
        read.positive(cfg, "max_position_embeddings", "rope_theta", "rms_norm_eps", "block_length")
        read.divides(cfg, "num_key_value_heads", "num_attention_heads")
        if cfg.moe_intermediate_size is None:
            raise read.fail("moe_intermediate_size (each expert's width) is missing")
        if cfg.num_shared_experts < 0:
            raise read.fail(f"num_shared_experts must be >= 0, got {cfg.num_shared_experts}")
        if not 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers:
            raise read.fail(
                f"first_k_dense_replace={cfg.first_k_dense_replace} must be in 0..num_hidden_layers "
                f"({cfg.num_hidden_layers})"
            )
        if cfg.first_k_dense_replace and not (cfg.intermediate_size or 0) > 0:
            raise read.fail(
                f"intermediate_size must be > 0: the first {cfg.first_k_dense_replace} layers "
                f"(first_k_dense_replace) have a dense MLP; got {cfg.intermediate_size}"
            )
        _check_routing(read, cfg)
        _check_rotary(read, cfg, raw.get("rotary_dim"))
        read.token_ids(cfg, "vocab_size", cfg.vocab_size, "mask_token_id", "eos_token_id", "pad_token_id")
        return cfg

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """The features of each query and key head that RoPE rotates (the first ones)."""
        return int(self.attention_head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, index: int) -> bool:
        return index >= self.first_k_dense_replace


def _check_routing(read: ConfigReader, cfg: LLaDA2Config) -> None:
    """The group-limited top-k is defined for these settings only."""
    if cfg.num_experts % cfg.n_group:
        raise read.fail(f"num_experts={cfg.num_experts} is not a multiple of n_group={cfg.n_group}")
    per_group = cfg.num_experts // cfg.n_group
    if per_group < 2:
        raise read.fail(
            f"each of the n_group={cfg.n_group} expert groups needs 2 or more experts (a group scores "
            f"the sum of its two best); num_experts={cfg.num_experts} gives {per_group}"
        )
    if cfg.topk_group > cfg.n_group:
        raise read.fail(f"topk_group={cfg.topk_group} must be in 1..n_group ({cfg.n_group})")
    if cfg.num_experts_per_tok > cfg.topk_group * per_group:
        raise read.fail(
            f"num_experts_per_tok={cfg.num_experts_per_tok} must be at most the experts of the "
            f"topk_group={cfg.topk_group} chosen groups ({cfg.topk_group * per_group})"
        )


def _check_rotary(read: ConfigReader, cfg: LLaDA2Config, rotary_dim: Any) -> None:
    if not 0 < cfg.partial_rotary_factor <= 1:
        raise read.fail(f"partial_rotary_factor must be in (0, 1], got {cfg.partial_rotary_factor}")
    if cfg.rotary_dim < 2 or cfg.rotary_dim % 2:
        raise read.fail(
            f"partial_rotary_factor={cfg.partial_rotary_factor} of head_dim={cfg.attention_head_dim} "
            f"rotates {cfg.rotary_dim} features; RoPE needs an even number, 2 or more"
        )
    if rotary_dim is not None and rotary_dim != cfg.rotary_dim:
        raise read.fail(
            f"rotary_dim={rotary_dim} disagrees with partial_rotary_factor={cfg.partial_rotary_factor} "
            f"x head_dim={cfg.attention_head_dim} = {cfg.rotary_dim} (the published code uses the factor)"
        )


class LLaDA2Router(nn.Module):
    """The router's weight and expert bias under the checkpoint's ``mlp.gate`` keys."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))


class GroupLimitedMoE(nn.Module):
    """LLaDA2's mixture of experts, evaluated densely: every expert runs on every row it is
    given, weighted by the router (zero for the experts a row did not choose), so the step's
    shapes stay static and row-wise and each expert's weights are read once per step. The
    shared experts are a submodule here (the checkpoint keeps them under ``mlp``) but the block
    adds them, so that ``reduce`` (tensor parallel) sums the routed part only."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        e, i, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.scaling = cfg.routed_scaling_factor
        self.gate = LLaDA2Router(cfg)
        self.gate_proj = nn.Parameter(torch.empty(e, i, d))
        self.up_proj = nn.Parameter(torch.empty(e, i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        if cfg.num_shared_experts:
            self.shared_experts = _dense_mlp(d, i * cfg.num_shared_experts)
        else:
            self.shared_experts = None
        self.reduce = None
        self.register_load_state_dict_pre_hook(_stack_expert_keys)
        self.register_state_dict_post_hook(_unstack_expert_keys)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(..., experts) weights in fp32: the routed scale of each chosen expert, 0 elsewhere."""
        scores = torch.sigmoid(F.linear(x.float(), self.gate.weight.float()))
        biased = scores + self.gate.expert_bias.float()
        grouped = biased.unflatten(-1, (self.n_group, -1))
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        groups = group_scores.topk(self.topk_group, dim=-1).indices
        allowed = torch.zeros_like(group_scores).scatter(-1, groups, 1.0).bool()
        allowed = allowed.unsqueeze(-1).expand(grouped.shape).flatten(-2)
        chosen = biased.masked_fill(~allowed, float("-inf")).topk(self.top_k, dim=-1).indices
        top = scores.gather(-1, chosen)
        if self.top_k > 1:
            top = top / (top.sum(-1, keepdim=True) + 1e-20)
        return torch.zeros_like(scores).scatter(-1, chosen, top * self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.routing_weights(x).to(x.dtype)
        gate = torch.einsum("...d,eid->...ei", x, self.gate_proj)
        up = torch.einsum("...d,eid->...ei", x, self.up_proj)
        out = torch.einsum("...ei,edi->...ed", F.silu(gate) * up, self.down_proj)
        out = torch.einsum("...e,...ed->...d", weights, out)
        return out if self.reduce is None else self.reduce(out)


class LLaDA2Attention(nn.Module):
    """The attention's modules under the checkpoint's names; the fused ``query_key_value`` of
    the checkpoint is read into (and saved from) the three projections ``q_proj``, ``k_proj``,
    ``v_proj``."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.attention_head_dim
        self.widths = (
            cfg.num_attention_heads * hd,
            cfg.num_key_value_heads * hd,
            cfg.num_key_value_heads * hd,
        )
        self.q_proj = nn.Linear(d, self.widths[0], bias=cfg.use_qkv_bias)
        self.k_proj = nn.Linear(d, self.widths[1], bias=cfg.use_qkv_bias)
        self.v_proj = nn.Linear(d, self.widths[2], bias=cfg.use_qkv_bias)
        self.query_layernorm = RMSNorm(hd, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(hd, cfg.rms_norm_eps)
        self.dense = nn.Linear(cfg.num_attention_heads * hd, d, bias=cfg.use_bias)
        self.register_load_state_dict_pre_hook(_split_qkv_keys)
        self.register_state_dict_post_hook(_fuse_qkv_keys)


_QKV = ("q_proj", "k_proj", "v_proj")


def _split_qkv_keys(module, state, prefix, *args) -> None:
    """Checkpoint key ``query_key_value.{weight,bias}`` -> the three projections' keys."""
    for kind in ("weight", "bias"):
        fused = state.pop(f"{prefix}query_key_value.{kind}", None)
        if fused is None:
            continue
        if fused.shape[0] != sum(module.widths):
            state[f"{prefix}query_key_value.{kind}"] = fused  # mis-shaped: the check names it
            continue
        for name, part in zip(_QKV, fused.split(module.widths)):
            state[f"{prefix}{name}.{kind}"] = part


def _fuse_qkv_keys(module, state, prefix, local_metadata) -> None:
    """The three projections' keys -> the checkpoint's ``query_key_value`` (saving, checks)."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in _QKV]
        if all(k in state for k in keys):
            state[f"{prefix}query_key_value.{kind}"] = torch.cat([state.pop(k) for k in keys])


class LLaDA2Block(nn.Module):
    """One decoder layer: attention (QK norm, partial RoPE, the block-causal mask the model
    builds), then the dense MLP or the experts plus the shared experts."""

    def __init__(self, cfg: LLaDA2Config, index: int):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.attention = LLaDA2Attention(cfg)
        self.moe = cfg.is_moe_layer(index)
        self.mlp = GroupLimitedMoE(cfg) if self.moe else _dense_mlp(d, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask):
        a = self.attention
        h = self.input_layernorm(x)
        x = x + self_attention(
            h,
            a.q_proj,
            a.k_proj,
            a.v_proj,
            a.dense,
            self.n_heads,
            self.n_kv_heads,
            cos,
            sin,
            mask,
            a.query_layernorm,
            a.key_layernorm,
        )
        h = self.post_attention_layernorm(x)
        if not self.moe:
            return x + swiglu_mlp(h, self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj)
        out = self.mlp(h)
        shared = self.mlp.shared_experts
        if shared is not None:
            out = out + swiglu_mlp(h, shared.gate_proj, shared.up_proj, shared.down_proj)
        return x + out


class _LLaDA2Backbone(nn.Module):
    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LLaDA2Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def block_causal_mask(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None, block_length: int
) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, T, T): a query sees the keys of its own block and of every block
    before it (blocks of ``block_length`` positions from position 0), padding hidden. Counting
    blocks by position keeps a left-padded row's blocks where the row alone has them."""
    block = torch.div(position_ids, block_length, rounding_mode="floor")
    allowed = block[:, None, :, None] >= block[:, None, None, :]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    return allowed


class LLaDA2ModelLM(BidirectionalLM):
    """LLaDA2 block-diffusion LM (no logit shift; LLaDA's mask and response conventions).
    ``forward`` returns logits (B, T, vocab) under the block-causal mask."""

    architecture = "llada2"

    def __init__(self, cfg: LLaDA2Config):
        super().__init__(cfg, logits_shift=0, max_length=cfg.max_position_embeddings)
        self.model = _LLaDA2Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def attention_block_length(self) -> int:
        """The attention's block: finished blocks' K/V is exact, generation goes block by block."""
        return self.config.block_length

    def attention_mask(self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor):
        return block_causal_mask(position_ids, attention_mask, self.config.block_length)

    def parts(self) -> LMParts:
        m, cfg = self.model, self.config
        head = None if cfg.tie_word_embeddings else self.lm_head
        return LMParts(m.word_embeddings, m.layers, m.norm, head, cfg.rotary_dim, cfg.rope_theta)


def tiny_random_config(vocab_size: int = 64, mask_token_id: int = 63, eos_token_id: int = 62) -> dict:
    """A config.json content for a tiny random LLaDA2 (the ``llada2:random`` bench row): every
    feature of the published layout (a dense first layer, grouped routing with a shared expert,
    GQA, partial RoPE), small enough for a CPU test."""
    return {
        "model_type": "llada2_moe",
        "architectures": ["LLaDA2MoeModelLM"],
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "num_hidden_layers": 3,
        "vocab_size": vocab_size,
        "intermediate_size": 48,
        "moe_intermediate_size": 16,
        "num_experts": 8,
        "num_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "partial_rotary_factor": 0.5,
        "use_qkv_bias": False,
        "use_bias": False,
        "use_qk_norm": True,
        "score_function": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rope_theta": 600000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "mask_token_id": mask_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "block_length": 8,
    }


def random_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LLaDA2ModelLM:
    """A LLaDA2 of :func:`tiny_random_config` (``overrides`` replace its keys, ``vocab_size`` and
    the token ids for a tokenizer's) with random weights drawn from ``seed``: norms near 1, a
    small expert bias, an output head wide enough that the logits are not near-ties."""
    config = {**tiny_random_config(), **overrides}
    if "pad_token_id" not in overrides:  # padding is EOS, as in the published config
        config["pad_token_id"] = config["eos_token_id"]
    model = LLaDA2ModelLM(LLaDA2Config.from_dict(config, "llada2:random"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith("expert_bias"):
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen))
            else:
                tensor.copy_(
                    (0.9 if name == "lm_head.weight" else 0.3) * torch.randn(tensor.shape, generator=gen)
                )
    return model.eval().to(dtype)


__all__ = [
    "LLADA2_BLOCK_LENGTH",
    "LLADA2_EOS_TOKEN_ID",
    "LLADA2_MASK_TOKEN_ID",
    "LLaDA2Config",
    "LLaDA2ModelLM",
    "block_causal_mask",
    "random_model",
    "tiny_random_config",
]
