"""What the runtime needs to know about a diffusion LM, independent of its architecture."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DiffusionSpec:
    """Token ids and conventions of a masked diffusion LM.

    ``logits_shift`` is 1 for models trained with the autoregressive shift (Dream: the logit
    for position i is read from position i - 1), 0 otherwise (LLaDA).
    """

    mask_token_id: int
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None
    logits_shift: int = 0
    max_length: int | None = None
