"""Tiny random LLaDA-like and Dream-like checkpoints for the tests (not a test module).

The models keep the published state-dict key names and layouts (LLaDA: OLMo names, no biases;
Dream: Qwen2 names, q/k/v biases, grouped-query attention) with every size scaled down, and the
folders they are written to look like Hugging Face checkpoints: config.json, safetensors
(optionally sharded with an index) and the char tokenizer's tokenizer.json.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dyllm_fx.char_tokenizer import build_char_tokenizer
from dyllm_fx.eval.synthetic_tasks import ALPHABET
from dyllm_fx.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM, save_model

# Small enough that a 2-layer model spreads over several shards.
SHARD_BYTES = 16 * 1024


def tiny_tokenizer():
    return build_char_tokenizer(ALPHABET)


def tiny_llada_config(vocab: int, **overrides) -> LLaDAConfig:
    tok = tiny_tokenizer()
    fields = dict(
        d_model=32,
        n_heads=4,
        n_kv_heads=4,
        n_layers=2,
        mlp_hidden_size=64,
        vocab_size=vocab,
        embedding_size=vocab,
        max_sequence_length=128,
        rope_theta=10000.0,
        mask_token_id=tok.mask_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    fields.update(overrides)
    return LLaDAConfig(**fields)


def tiny_dream_config(vocab: int, **overrides) -> DreamConfig:
    tok = tiny_tokenizer()
    fields = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        rope_theta=10000.0,
        mask_token_id=tok.mask_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    fields.update(overrides)
    return DreamConfig(**fields)


NORMS = ("norm.weight", "ln_f.weight")  # LLaDA's final norm is ln_f


def randomize_(
    model: nn.Module,
    seed: int = 0,
    norm_std: float = 0.2,
    head_scale: float = 1.0,
    norms: tuple[str, ...] = NORMS,
) -> nn.Module:
    """Give every parameter (norm weights and biases included) non-trivial random values, so a
    weight that is dropped, swapped or left at its init changes the logits: the parameters whose
    names end in one of ``norms`` around 1 (std ``norm_std``), the others around 0 (std 0.3).
    ``head_scale`` > 1 widens the logit gaps (peaked confidences, no near-ties between runs that
    should agree)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(norms):
                p.copy_(1.0 + norm_std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        if head_scale != 1.0:
            head = model.lm_head if isinstance(model, DreamModel) else model.model.transformer.ff_out
            head.weight.mul_(head_scale)
    return model.eval()


def tiny_llada(
    seed: int = 0, norm_std: float = 0.2, head_scale: float = 1.0, norms: tuple[str, ...] = NORMS, **overrides
) -> LLaDAModelLM:
    """A 2-layer LLaDA; ``overrides`` are :class:`LLaDAConfig` fields."""
    model = LLaDAModelLM(tiny_llada_config(len(tiny_tokenizer()), **overrides))
    return randomize_(model, seed, norm_std, head_scale, norms)


def tiny_dream(
    seed: int = 0, norm_std: float = 0.2, head_scale: float = 1.0, norms: tuple[str, ...] = NORMS, **overrides
) -> DreamModel:
    """A 2-layer Dream with grouped-query attention; ``overrides`` are :class:`DreamConfig` fields."""
    model = DreamModel(tiny_dream_config(len(tiny_tokenizer()), **overrides))
    return randomize_(model, seed, norm_std, head_scale, norms)


def write_model(model: nn.Module, folder: str | Path, sharded: bool = False) -> Path:
    folder = Path(folder)
    save_model(model, folder, max_shard_bytes=SHARD_BYTES if sharded else None)
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def write_tiny_llada(folder: str | Path, sharded: bool = False, seed: int = 0) -> Path:
    return write_model(tiny_llada(seed), folder, sharded)


def write_tiny_dream(folder: str | Path, sharded: bool = False, seed: int = 0) -> Path:
    return write_model(tiny_dream(seed), folder, sharded)
