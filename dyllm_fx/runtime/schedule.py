"""How many tokens each denoising step unmasks, and the block layout of the response."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

# torch is imported inside the functions that need it: the command line checks a block layout
# (BlockSchedule.build) before it imports torch.
if TYPE_CHECKING:
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


@dataclass(frozen=True)
class Layout:
    """A family of generations: what fixes the step shapes a policy can reach (its plan keys,
    ``Policy.plan_keys``), e.g. the generations one export serves.

    ``steps`` None: ``gen_length`` (one token per step, ``generate()``'s default);
    ``threshold``: confidence-threshold decoding (any number of tokens per step); ``max_seq``:
    the longest prompt + response (None: the model's window); ``max_commit``: the most tokens
    one step commits (None: from the schedule, the whole block for Dream's last step and under
    threshold decoding).
    """

    gen_length: int = 64
    block_length: int | None = 32
    steps: int | None = None
    threshold: bool = False
    max_seq: int | None = None
    max_commit: int | None = None

    def check(self, window: int | None) -> "Layout":
        """The layout with its defaults filled in; ValueError naming a bad combination."""
        steps = None if self.threshold else (self.gen_length if self.steps is None else self.steps)
        BlockSchedule.build(1, self.gen_length, self.block_length, steps)  # the loop's own checks
        max_seq = self.max_seq if self.max_seq is not None else (window or self.gen_length + 512)
        if max_seq <= self.gen_length:
            raise ValueError(
                f"max_seq={max_seq} leaves no room for a prompt before gen_length={self.gen_length}"
            )
        if window is not None and max_seq > window:
            raise ValueError(f"max_seq={max_seq} exceeds the model's window of {window} tokens")
        return Layout(self.gen_length, self.block, steps, self.threshold, max_seq, self.max_commit)

    @property
    def block(self) -> int:
        return self.gen_length if self.block_length is None else self.block_length

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block

    def seq_lens(self) -> range:
        """Every prompt + response length the layout serves (filled by :meth:`check`)."""
        return range(self.gen_length + 1, self.max_seq + 1)

    def block_bounds(self, seq_len: int, block: int) -> tuple[int, int]:
        """[start, end) of block ``block`` of a ``seq_len``-token sequence."""
        start = seq_len - self.gen_length + block * self.block
        return start, start + self.block

    def steps_per_block(self) -> int | None:
        return None if self.threshold else self.steps // self.num_blocks

    def commits(self, dream: bool) -> int:
        """The most tokens one step commits (``HostState.last_committed``)."""
        if self.max_commit is not None:
            return self.max_commit
        spb = self.steps_per_block()
        if spb is None or dream:  # threshold decoding; Dream's last step commits what is left
            return self.block
        return math.ceil(self.block / spb)

    def in_block_steps(self) -> int:
        """The most steps a block takes (the loop's caps, ES-dLLM's extra steps included)."""
        spb = self.steps_per_block()
        return 2 * self.block if spb is None else spb + self.block

    def to_json(self) -> dict:
        return {
            "gen_length": self.gen_length,
            "block_length": self.block_length,
            "steps": self.steps,
            "threshold": self.threshold,
            "max_seq": self.max_seq,
            "max_commit": self.max_commit,
        }


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
    import torch

    base = masked_per_row // steps
    remainder = masked_per_row % steps
    counts = base[:, None].repeat(1, steps)
    counts += (torch.arange(steps, device=masked_per_row.device)[None, :] < remainder[:, None]).long()
    return counts


def dream_timesteps(steps: int, eps: float) -> torch.Tensor:
    """Dream's linear time grid from 1 to eps (steps + 1 points)."""
    import torch

    return torch.linspace(1, eps, steps + 1)


def dream_transfer_count(masked: int, step: int, steps: int, timesteps: torch.Tensor) -> int:
    """Dream's count: int(masked * (1 - s/t)) for t, s consecutive grid points; all at the last step."""
    if step == steps - 1:
        return masked
    import torch

    # float32 tensor arithmetic, as the reference, so the int() cut falls on the same side.
    t, s = timesteps[step], timesteps[step + 1]
    return int(torch.tensor(float(masked)) * (1 - s / t))
