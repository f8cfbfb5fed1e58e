"""Token agreement: how much of an accelerated decode is token-for-token the vanilla one.

Exact match on a benchmark hides small drifts that happen not to change the extracted
answer; agreement counts every generated position. Both runs must use the same prompts,
batching and decoding arguments (so the response windows line up position by position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class AgreementCounter:
    """Running count of identical positions over many response pairs."""

    same: int = 0
    total: int = 0

    def update(
        self,
        responses: torch.Tensor | Sequence[Sequence[int]],
        reference: torch.Tensor | Sequence[Sequence[int]],
    ) -> None:
        """Add a batch: (B, G) response token ids and the reference run's (B, G)."""
        a, b = torch.as_tensor(responses), torch.as_tensor(reference)
        if a.shape != b.shape:
            raise ValueError(
                f"response shapes differ ({tuple(a.shape)} vs reference {tuple(b.shape)}); agreement needs "
                "both runs "
                "decoded with the same prompts, batch size and gen_length"
            )
        self.same += int((a == b).sum())
        self.total += a.numel()

    @property
    def value(self) -> float:
        """Fraction of identical positions (1.0 when nothing was compared)."""
        return self.same / self.total if self.total else 1.0


def token_agreement(
    responses: torch.Tensor | Sequence[Sequence[int]], reference: torch.Tensor | Sequence[Sequence[int]]
) -> float:
    """Fraction of generated positions whose token equals the reference run's token."""
    counter = AgreementCounter()
    counter.update(responses, reference)
    return counter.value
