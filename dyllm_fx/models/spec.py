"""What the runtime needs to know about a diffusion LM, independent of its architecture."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..vocab_parallel import VocabShard


@dataclass(frozen=True)
class DiffusionSpec:
    """Token ids and conventions of a masked diffusion LM.

    ``logits_shift`` is 1 for models trained with the autoregressive shift (Dream: the logit
    for position i is read from position i - 1), 0 otherwise (LLaDA). ``trained_gen_length``
    is the response window the model was trained with, when its folder records one (the
    embedded model's training.json): ``generate`` warns when another window is asked for.
    ``sampler_defaults`` are the checkpoint's own sampler settings (``(name, value)`` pairs from
    a Dream-family ``generation_config.json``: ``alg``, ``temperature``, ...), under the
    arguments ``generate`` is given. ``vocab_shard`` is set on a tensor-parallel shard whose LM
    head is split over the vocabulary: its logits are that slice (``dyllm_fx/vocab_parallel.py``).
    """

    mask_token_id: int
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None
    logits_shift: int = 0
    max_length: int | None = None
    trained_gen_length: int | None = None
    sampler_defaults: tuple[tuple[str, object], ...] = ()
    vocab_shard: VocabShard | None = None
