"""MMaDA-8B's language model (Gen-Verse/MMaDA-8B-Base / -MixCoT), for text generation.

The published ``MMadaModelLM`` subclasses LLaDA's ``LLaDAModelLM`` (``base_model_prefix
"model"``) and changes no module, so its safetensors carry LLaDA's own keys
(``model.transformer.wte.weight``, ``model.transformer.blocks.{i}.q_proj.weight``, ...). What
differs is config.json: ``model_type: mmada``, ``architectures: ["MMadaModelLM"]``, and a
vocabulary widened for the image codes (``vocab_size`` = ``embedding_size`` = ``new_vocab_size``,
the text tokenizer's ``llm_vocab_size`` ids first, then ``codebook_size`` image codes). Text
generation reads every logit, as the published ``generate.py`` does; the mask id is
config.json's ``mask_token_id`` (LLaDA's 126336 when it is absent), which must be a text id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config_fields import ConfigReader
from .llada import LLaDAConfig, LLaDAModelLM


@dataclass
class MMaDAConfig(LLaDAConfig):
    """LLaDA's fields plus the multimodal vocabulary of MMaDA's config.json."""

    llm_vocab_size: int | None = None  # the text tokenizer's ids: 0 .. llm_vocab_size - 1
    new_vocab_size: int | None = None
    codebook_size: int | None = None  # image codes after the text ids (image generation only)
    num_vq_tokens: int | None = None
    num_new_special_tokens: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "MMaDAConfig":
        """LLaDA's checks, then: the mask, EOS and pad ids are text ids, and the embedding
        holds every id ``new_vocab_size`` names."""
        cfg = super().from_dict(raw, source)
        read = ConfigReader(source)
        read.positive(cfg, "llm_vocab_size", "new_vocab_size", "codebook_size", "num_vq_tokens")
        if cfg.llm_vocab_size is not None:
            if cfg.llm_vocab_size > cfg.padded_vocab:
                raise read.fail(
                    f"llm_vocab_size={cfg.llm_vocab_size} is larger than the embedding "
                    f"({cfg.padded_vocab} rows)"
                )
            read.token_ids(
                cfg, "llm_vocab_size", cfg.llm_vocab_size, "mask_token_id", "eos_token_id", "pad_token_id"
            )
        if cfg.new_vocab_size is not None and cfg.new_vocab_size > cfg.padded_vocab:
            raise read.fail(
                f"new_vocab_size={cfg.new_vocab_size} is larger than the embedding "
                f"({cfg.padded_vocab} rows): set vocab_size / embedding_size to the resized vocabulary"
            )
        return cfg


class MMaDAModelLM(LLaDAModelLM):
    """MMaDA's text model: LLaDA's network under LLaDA's keys, MMaDA's vocabulary and mask id."""

    architecture = "mmada"


__all__ = ["MMaDAConfig", "MMaDAModelLM"]
