"""The rows of the random-model benches (``dyllm bench --model <family>:random``): a method, its
result, the table, and the random prompts every family's bench decodes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import MethodNotApplicable

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


def check_methods(methods: list[RandomMethod]) -> None:
    """The first method is the untransformed model (policy None): speedups are relative to it."""
    if not methods or methods[0].policy is not None:
        raise ValueError(
            "the first method must be the untransformed model (policy None): speedups are relative to it"
        )


def run_methods(
    model,
    methods: list[RandomMethod],
    decode: Callable,
    active: Callable,
    repeats: int = 1,
) -> list[RandomResult]:
    """Every method on ``model``, untransformed first: ``decode(runner)`` returns (response ids,
    model calls), timed ``repeats`` times (the fastest kept); ``active(runner)`` the mean
    fraction of rows that ran the MLP. A method the family cannot run (the adapter raises
    :class:`~dyllm_fx.errors.MethodNotApplicable`) is a row that says why."""
    from ..transform import transform

    check_methods(methods)
    results, reference, base_time = [], None, None
    for method in methods:
        try:
            runner = (
                model if method.policy is None else transform(model, policy=method.policy, **method.params)
            )
        except MethodNotApplicable as refusal:
            results.append(RandomResult(method.label, 0.0, 0.0, 0.0, 0.0, 0.0, refused=str(refusal)))
            continue
        best, responses, nfe = float("inf"), None, 0
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            responses, nfe = decode(runner)
            best = min(best, time.perf_counter() - start)
        if reference is None:
            reference, base_time = responses, best
        results.append(
            RandomResult(
                method=method.label,
                tokens_per_s=responses.numel() / best,
                speedup=base_time / best,
                agreement=float((responses == reference).float().mean()),
                nfe=float(nfe),
                active_fraction=active(runner),
            )
        )
    return results


__all__ = [
    "SUFFIX",
    "RandomMethod",
    "RandomResult",
    "check_methods",
    "format_random_table",
    "random_prompts",
    "run_methods",
]
