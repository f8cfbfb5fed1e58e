"""The rows of the random-model benches (``dyllm bench --model <family>:random``): a method, its
result, the table, and the random prompts every family's bench decodes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SUFFIX = ":random"


@dataclass(frozen=True)
class RandomMethod:
    label: str
    policy: str | None  # None: the untransformed model
    params: dict = field(default_factory=dict)


@dataclass
class RandomResult:
    method: str
    tokens_per_s: float
    speedup: float
    agreement: float
    nfe: float  # model calls per prompt batch
    # mean over steps and layers of the rows that ran the MLP, in the batch element that ran
    # the most (the engine's StepRecord.active)
    active_fraction: float
    refused: str | None = None  # why the family cannot run this method (then no figures)


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random prompts of up to ``length`` tokens, left padded (ragged lengths), ids in
    3 .. vocab - 1 (the special ids of the random models lie outside)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=gen)
    mask = torch.ones_like(ids)
    for b in range(n):
        pad = int(torch.randint(0, max(1, length // 2), (1,), generator=gen))
        mask[b, :pad] = 0
        ids[b, :pad] = 0
    return ids, mask


def format_random_table(results: list[RandomResult], family: str = "") -> str:
    head = f"{'method':36s} {'tokens/s':>9s} {'speedup':>8s} {'agreement':>9s} {'nfe':>5s} {'active':>7s}"
    lines = [f"{family}{SUFFIX}" if family else "", head, "-" * len(head)]
    for r in results:
        if r.refused:
            lines.append(f"{r.method:36s} refused: {r.refused}")
            continue
        lines.append(
            f"{r.method:36s} {r.tokens_per_s:9.1f} {r.speedup:7.2f}x {r.agreement:9.3f} {r.nfe:5.0f} "
            f"{r.active_fraction:7.2f}"
        )
    lines.append(
        "random weights: no accuracy to report; agreement = tokens equal to the untransformed model's;"
    )
    lines.append(
        "active = rows that ran the MLP, mean over steps and layers, in the batch element that ran the most"
    )
    return "\n".join(line for line in lines if line)


__all__ = ["SUFFIX", "RandomMethod", "RandomResult", "format_random_table", "random_prompts"]
