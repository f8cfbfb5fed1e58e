"""``SamplingParams``: how one request is decoded, with vLLM's names where they fit.

A masked diffusion LM decodes a fixed *response window* block by block; ``max_tokens`` sets
that window (rounded up to a whole number of blocks, the text cut back to ``max_tokens``).
``block_length``, ``steps`` and ``threshold`` are the diffusion-specific knobs of
:func:`dyllm_fx.generate`, with the same meaning and defaults.

Requests share a batch when they share the block clock: the same ``block_length`` and the
same steps per block (``steps`` / number of blocks), or both threshold decoding. Everything
else (temperature, top-p / top-k, remasking order, threshold value, seed, window length) may
differ between the rows of one batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..runtime.schedule import BlockSchedule
from ..values import check_integer, check_number, check_seed

DEFAULT_WINDOW = 64  # generate()'s default gen_length


@dataclass
class SamplingParams:
    """Decoding parameters of one request.

    Args:
        max_tokens: the most response tokens returned. The response window the model decodes
            is ``max_tokens`` rounded up to a multiple of ``block_length``. None: the window the
            model was trained with (its folder's training.json), else 64.
        block_length: semi-autoregressive block size (default 32, as ``generate``); None: one
            block (the whole window). Streaming emits text at each block's end.
        steps: denoising steps over the whole window, a multiple of the number of blocks;
            None: one token per step (``steps`` = window). Ignored under ``threshold``.
        threshold: Fast-dLLM confidence-threshold parallel decoding, in (0, 1].
        temperature: 0 is greedy (deterministic); > 0 samples (LLaDA: Gumbel-max in float64;
            Dream: softmax sampling).
        top_p, top_k: nucleus / top-k filtering (Dream models; 1.0 and -1 / 0 mean off, as in vLLM).
        stop: a string or list of strings; the text ends before the first one found (checked
            as each block commits), with ``finish_reason="stop"``.
        seed: a per-request random seed: the request draws from its own generator, so its
            tokens do not depend on what else runs in its batch.
        n: completions per prompt (each its own row; with a seed, completion i uses seed + i).
        remasking: LLaDA's commit order, "low_confidence" (default) or "random".
        alg: Dream's commit order, "entropy" (default), "maskgit_plus", "topk_margin" or "origin".
        alg_temp: Dream's confidence temperature (None: deterministic order).
        skip_special_tokens: drop special tokens when decoding the text.
    """

    max_tokens: int | None = None
    block_length: int | None = 32
    steps: int | None = None
    threshold: float | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    remasking: str | None = None
    alg: str | None = None
    alg_temp: float | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        check_integer("max_tokens", self.max_tokens, minimum=1, allow_none=True)
        check_integer("block_length", self.block_length, minimum=1, allow_none=True, hint="; None: one block")
        check_integer("steps", self.steps, minimum=1, allow_none=True)
        check_integer("n", self.n, minimum=1)
        check_seed("seed", self.seed, count=self.n)
        check_integer("top_k", self.top_k, minimum=-1, allow_none=True, hint="; -1 or 0 turns top-k off")
        if self.temperature is None:
            self.temperature = 0.0
        check_number("temperature", self.temperature, minimum=0, hint="; 0 decodes greedily")
        check_number("top_p", self.top_p, minimum=0, maximum=1, above=True, allow_none=True, hint="; 1: off")
        check_number(
            "threshold",
            self.threshold,
            minimum=0,
            maximum=1,
            above=True,
            allow_none=True,
            hint="; 0.9 is the Fast-dLLM default",
        )
        check_number("alg_temp", self.alg_temp, minimum=0, allow_none=True)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise TypeError(
                f"stop must be a string or a list of strings, got {type(self.stop).__name__} {self.stop!r}; "
                'e.g. stop="\\n" or stop=["\\n", "."]'
            )
        if any(not isinstance(s, str) for s in self.stop or []):
            raise TypeError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = [s for s in (self.stop or []) if s]

    def clone(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    def sampler_kwargs(self, dream: bool) -> dict:
        """The sampler keyword arguments of ``dyllm_fx.generate`` these parameters set."""
        kw: dict = {"temperature": float(self.temperature)}
        top_p = None if self.top_p is None or self.top_p >= 1.0 else float(self.top_p)
        top_k = None if self.top_k is None or self.top_k <= 0 else int(self.top_k)
        if not dream and (top_p is not None or top_k is not None):
            raise ValueError(
                "top_p / top_k apply to Dream models; LLaDA samples with temperature (Gumbel-max) and "
                "commits by "
                "remasking='low_confidence' or 'random'"
            )
        if dream:
            kw.update(top_p=top_p, top_k=top_k, alg_temp=self.alg_temp)
            if self.alg is not None:
                kw["alg"] = self.alg
            elif self.threshold is not None:
                kw["alg"] = "maskgit_plus"  # threshold decoding needs a probability (generate says so too)
            if self.remasking is not None:
                raise ValueError(
                    "remasking is a LLaDA option; Dream models choose the commit order with alg="
                )
        else:
            if self.remasking is not None:
                kw["remasking"] = self.remasking
            if self.alg is not None or self.alg_temp is not None:
                raise ValueError(
                    "alg / alg_temp are Dream options; LLaDA models take remasking='low_confidence' or "
                    "'random'"
                )
        return kw


@dataclass(frozen=True)
class Resolved:
    """``SamplingParams`` checked against a model: the window, the block clock, the text limit."""

    window: int  # response tokens the model decodes (a whole number of blocks)
    max_tokens: int  # response tokens returned at most (<= window)
    block_length: int
    steps_per_block: int | None  # None: threshold decoding

    @property
    def num_blocks(self) -> int:
        return self.window // self.block_length

    @property
    def key(self) -> tuple:
        """Requests with the same key share one block clock, so they may share a batch."""
        return (self.block_length, self.steps_per_block)


def resolve(params: SamplingParams, trained_window: int | None, max_length: int | None) -> Resolved:
    """The window and block clock of ``params``; ValueError naming the fix when they do not fit."""
    max_tokens = params.max_tokens if params.max_tokens is not None else (trained_window or DEFAULT_WINDOW)
    block = params.block_length
    window = max_tokens if block is None else math.ceil(max_tokens / block) * block
    if max_length is not None and window >= max_length:
        raise ValueError(
            f"max_tokens={max_tokens} (a {window}-token response window) leaves no room for a prompt in the "
            "model's "
            f"{max_length}-token window; use max_tokens <= "
            f"{max(1, max_length - 1 - (max_length - 1) % (block or 1))}"
        )
    steps = params.steps if params.threshold is None else None
    if params.threshold is None and steps is None:
        steps = window
    schedule = BlockSchedule.build(0, window, block, steps)
    return Resolved(window, max_tokens, schedule.block_length, schedule.steps_per_block)


__all__ = ["DEFAULT_WINDOW", "Resolved", "SamplingParams", "resolve"]
