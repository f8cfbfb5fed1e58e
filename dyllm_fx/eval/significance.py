"""Intervals and paired tests for exact-match accuracies.

* :func:`wilson_interval`: the 95% Wilson score interval of a proportion (good at small n and
  at 0% / 100%, where the normal approximation collapses to a point).
* :func:`paired_counts` and :func:`mcnemar_exact`: a method against a reference (vanilla) on
  the same prompts. Only the discordant prompts carry information: ``won`` (the method right,
  the reference wrong) and ``lost`` (the reverse). Under "no difference" each discordant
  prompt falls either way with probability 1/2, so the exact McNemar test is a two-sided
  binomial test of ``won`` out of ``won + lost`` at p = 1/2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95% standard normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for ``successes`` out of ``n`` (``(0, 1)`` when n is 0)."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # The bounds are exactly 0 / 1 at the ends; clamp rounding only.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def mcnemar_exact(won: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least as uneven as ``won``:``lost``)
    under Binomial(won + lost, 1/2). 1.0 when there are no discordant pairs."""
    if won < 0 or lost < 0:
        raise ValueError(f"won and lost must be >= 0, got {won}, {lost}")
    n = won + lost
    if n == 0:
        return 1.0
    k = min(won, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_counts(correct: Sequence[bool], reference: Sequence[bool]) -> tuple[int, int]:
    """``(won, lost)``: prompts the method gets right and the reference wrong, and the reverse."""
    if len(correct) != len(reference):
        raise ValueError(
            f"paired comparison needs the same prompts: {len(correct)} vs {len(reference)} results"
        )
    won = sum(bool(a) and not bool(b) for a, b in zip(correct, reference))
    lost = sum(bool(b) and not bool(a) for a, b in zip(correct, reference))
    return won, lost


@dataclass(frozen=True)
class Paired:
    """A method against the reference on the same prompts."""

    won: int
    lost: int
    p_value: float

    @classmethod
    def of(cls, correct: Sequence[bool], reference: Sequence[bool]) -> "Paired":
        won, lost = paired_counts(correct, reference)
        return cls(won, lost, mcnemar_exact(won, lost))


def format_accuracy(correct: int, n: int) -> str:
    """``"64.6% [57.1, 71.4]"``: accuracy and its 95% Wilson interval, in percent."""
    low, high = wilson_interval(correct, n)
    acc = correct / n if n else 0.0
    return f"{100 * acc:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def format_p(p: float) -> str:
    """A p-value for a table: three significant digits, ``<0.001`` below that."""
    return "<0.001" if p < 0.001 else f"{p:.3g}"


__all__ = [
    "Paired",
    "Z95",
    "format_accuracy",
    "format_p",
    "mcnemar_exact",
    "paired_counts",
    "wilson_interval",
]
