"""How many tokens each denoising step unmasks, and the block layout of the response."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockSchedule:
    """Semi-autoregressive layout: the response is decoded block by block, left to right."""

    prompt_length: int
    gen_length: int
    block_length: int
    steps_per_block: int | None  # None: threshold decoding, run until the block is unmasked

    @classmethod
    def build(
        cls, prompt_length: int, gen_length: int, block_length: int | None, steps: int | None
    ) -> "BlockSchedule":
        gen_length = _as_int("gen_length", gen_length)
        steps = None if steps is None else _as_int("steps", steps)
        # Only None means "one block": block_length=0 is an error, not a silent default.
        block_length = gen_length if block_length is None else _as_int("block_length", block_length)
        if gen_length <= 0:
            raise ValueError(f"gen_length must be positive, got {gen_length}")
        if block_length <= 0:
            raise ValueError(
                f"block_length must be positive (or None for a single block), got {block_length}; "
                f"e.g. use block_length={_largest_divisor_at_most(gen_length, 32)}"
            )
        if gen_length % block_length:
            raise ValueError(
                f"block_length={block_length} must divide gen_length={gen_length}; "
                f"e.g. use block_length={_largest_divisor_at_most(gen_length, block_length)}"
            )
        num_blocks = gen_length // block_length
        if steps is None:
            return cls(prompt_length, gen_length, block_length, None)
        if steps <= 0 or steps % num_blocks:
            raise ValueError(
                f"steps={steps} must be a positive multiple of the number of blocks "
                f"(gen_length / block_length = {num_blocks}); e.g. "
                f"steps={max(1, round(steps / num_blocks)) * num_blocks}"
            )
        return cls(prompt_length, gen_length, block_length, steps // num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    def block_bounds(self, block: int) -> tuple[int, int]:
        start = self.prompt_length + block * self.block_length
        return start, start + self.block_length


def _as_int(name: str, value) -> int:
    """``value`` as a Python int (numpy / torch integers too); a clear TypeError otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {value!r} ({type(value).__name__}); pass e.g. "
            f"{name}=int({value!r})"
        ) from None


def _largest_divisor_at_most(n: int, bound: int) -> int:
    return max(d for d in range(1, max(1, min(n, bound)) + 1) if n % d == 0)


def llada_transfer_counts(masked_per_row: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's even split: (B,) masked counts -> (B, steps) tokens to unmask at each step.

    The remainder goes to the first steps, so every step unmasks floor or ceil of the average.
    """
    base = masked_per_row // steps
    remainder = masked_per_row % steps
    counts = base[:, None].repeat(1, steps)
    counts += (torch.arange(steps, device=masked_per_row.device)[None, :] < remainder[:, None]).long()
    return counts


def dream_timesteps(steps: int, eps: float) -> torch.Tensor:
    """Dream's linear time grid from 1 to eps (steps + 1 points)."""
    return torch.linspace(1, eps, steps + 1)


def dream_transfer_count(masked: int, step: int, steps: int, timesteps: torch.Tensor) -> int:
    """Dream's count: int(masked * (1 - s/t)) for t, s consecutive grid points; all at the last step."""
    if step == steps - 1:
        return masked
    # float32 tensor arithmetic, as the reference, so the int() cut falls on the same side.
    t, s = timesteps[step], timesteps[step + 1]
    return int(torch.tensor(float(masked)) * (1 - s / t))
