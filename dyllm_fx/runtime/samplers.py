"""Samplers: given the logits of the current block, choose which masked tokens to commit.

Each sampler follows a published reference step for step:

* :class:`LLaDASampler` -- LLaDA's ``generate``: Gumbel-max temperature sampling in float64,
  ``low_confidence`` or ``random`` remasking, an even per-step token budget per block.
* :class:`DreamSampler` -- Dream's ``diffusion_generate``: ``origin``, ``maskgit_plus``,
  ``topk_margin``, ``entropy`` with ``alg_temp``, ``top_p``/``top_k`` and an eps-scheduled
  time grid (``schedule="even"``: LLaDA's even split instead, as ES-dLLM's official Dream loop,
  one token per step at ``token_per_step=1``).
* ``threshold`` on either -- Fast-dLLM's parallel decoding: commit every masked token whose
  confidence reaches the threshold, and always at least the most confident one.

At temperature 0 the choices are identical to the references. With temperature > 0 they are
identical in distribution; the random streams differ because the logits here cover the
current block only, not the whole sequence.

On a tensor-parallel shard whose head is split over the vocabulary (``StepContext.vocab``) the
choices are taken from values reduced over the ranks (``dyllm_fx/vocab_parallel.py``): LLaDA's
sampler always, Dream's at temperature 0 without top-p / top-k with ``maskgit_plus`` or
``entropy``; Dream's other settings gather the block's masked logits first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..values import check_integer, check_number
from ..vocab_parallel import VocabShard, token_probability, vocab_argmax
from .sampling_math import add_gumbel_noise, dream_sample_tokens
from .schedule import dream_timesteps, dream_transfer_count, llada_transfer_counts


@dataclass(frozen=True)
class StepContext:
    """Where the loop is, as a sampler needs it."""

    step: int  # index of this step inside the block
    steps: int | None  # steps per block; None under threshold decoding
    initial_masked: torch.Tensor  # (B,) masked tokens in the block when it started
    block_start: int  # absolute position of the block's first token
    seq_len: int
    vocab: VocabShard | None = None  # the logits are this slice of the vocabulary (tensor parallel)


@dataclass(frozen=True)
class Selection:
    transfer: torch.Tensor  # (B, Lb) bool: commit these positions now
    tokens: torch.Tensor  # (B, Lb) long: the token to commit where transfer is set
    confidence: torch.Tensor  # (B, Lb) float: the score the choice was made by (-inf off the mask)


def _check_threshold(threshold: float | None) -> None:
    check_number(
        "threshold",
        threshold,
        minimum=0,
        maximum=1,
        above=True,
        allow_none=True,
        hint="; 0.9 is the Fast-dLLM default",
    )


def _check_temperature(temperature: float) -> None:
    check_number("temperature", temperature, minimum=0, hint="; 0 decodes greedily, 1 samples as trained")


def _select_top(confidence: torch.Tensor, counts: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Per row, mark the ``counts[b]`` highest-confidence positions.

    The references run top-k over the whole sequence (-inf outside the candidates); torch.topk
    breaks exact ties (probabilities that round to 1.0) differently for different lengths, so
    the block's scores are placed in a whole-sequence vector to break them the same way.
    """
    bsz, width = confidence.shape
    full = confidence.new_full((bsz, ctx.seq_len), -torch.inf)
    full[:, ctx.block_start : ctx.block_start + width] = confidence
    transfer = torch.zeros_like(confidence, dtype=torch.bool)
    for b in range(bsz):
        k = int(counts[b])
        if k > 0:
            idx = torch.topk(full[b], k).indices - ctx.block_start
            transfer[b, idx[(idx >= 0) & (idx < width)]] = True
    return transfer


def _select_threshold(confidence: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every masked position at or above ``threshold``, plus the best one of each row that still has masks."""
    transfer = masked & (confidence >= threshold)
    best = confidence.argmax(dim=-1)
    has_mask = masked.any(dim=-1)
    transfer[has_mask, best[has_mask]] = True
    return transfer


@dataclass
class LLaDASampler:
    """LLaDA's sampler (``remasking`` "low_confidence" or "random")."""

    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking must be 'low_confidence' or 'random', got {self.remasking!r}")
        _check_temperature(self.temperature)
        _check_threshold(self.threshold)
        if self.threshold is not None and self.remasking == "random":
            raise ValueError("threshold decoding needs a confidence; use remasking='low_confidence'")

    def select(self, logits: torch.Tensor, masked: torch.Tensor, ctx: StepContext) -> Selection:
        tokens = vocab_argmax(add_gumbel_noise(logits, self.temperature, ctx.vocab), ctx.vocab)
        if self.remasking == "low_confidence":
            conf = token_probability(logits, tokens, ctx.vocab)
        else:
            # The reference draws one number per position of the whole sequence; so do we.
            full = torch.rand(logits.shape[0], ctx.seq_len, device=logits.device)
            conf = full[:, ctx.block_start : ctx.block_start + logits.shape[1]]
        conf = torch.where(masked, conf, torch.full_like(conf, -torch.inf))
        if self.threshold is not None:
            transfer = _select_threshold(conf, masked, self.threshold)
        else:
            counts = llada_transfer_counts(ctx.initial_masked, ctx.steps)[:, ctx.step]
            transfer = _select_top(conf, counts, ctx)
        return Selection(transfer & masked, tokens, conf)


_DREAM_CONFIDENCE = {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy"}


@dataclass
class DreamSampler:
    """Dream's sampler (``alg`` "origin", "maskgit_plus", "topk_margin" or "entropy")."""

    alg: str = "entropy"
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    alg_temp: float | None = None
    eps: float = 1e-3
    threshold: float | None = None
    schedule: str = "dream"
    _grids: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.alg not in ("origin", *_DREAM_CONFIDENCE):
            raise ValueError(
                f"alg must be one of origin, maskgit_plus, topk_margin, entropy; got {self.alg!r}"
            )
        if not 0 < check_number("eps", self.eps) < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        _check_temperature(self.temperature)
        check_number(
            "top_p", self.top_p, minimum=0, maximum=1, above=True, allow_none=True, hint="; None: off"
        )
        check_integer(
            "top_k",
            self.top_k,
            minimum=1,
            allow_none=True,
            hint="; pass top_k=None to turn top-k filtering off",
        )
        check_number(
            "alg_temp", self.alg_temp, minimum=0, allow_none=True, hint="; None: a deterministic order"
        )
        _check_threshold(self.threshold)
        if self.schedule not in ("dream", "even"):
            raise ValueError(
                f"schedule must be 'dream' (its time grid) or 'even' (LLaDA's), got {self.schedule!r}"
            )
        if self.threshold is not None and self.alg not in ("maskgit_plus", "topk_margin"):
            raise ValueError(
                f"threshold decoding compares a probability with the threshold; alg={self.alg!r} has none. "
                "Use alg='maskgit_plus' (or 'topk_margin')."
            )

    def _grid(self, steps: int) -> torch.Tensor:
        if steps not in self._grids:
            self._grids[steps] = dream_timesteps(steps, self.eps)
        return self._grids[steps]

    def select(self, logits: torch.Tensor, masked: torch.Tensor, ctx: StepContext) -> Selection:
        tokens = torch.zeros(masked.shape, dtype=torch.long, device=logits.device)
        conf = torch.full(masked.shape, -torch.inf, dtype=torch.float32, device=logits.device)
        if not masked.any():
            return Selection(masked.clone(), tokens, conf)
        mask_logits = logits[masked]  # all masked rows of the batch at once, as the reference
        if self.alg == "origin":
            return self._select_origin(mask_logits, masked, ctx, tokens, conf)
        row_conf, row_tokens = dream_sample_tokens(
            mask_logits, self.temperature, self.top_p, self.top_k, _DREAM_CONFIDENCE[self.alg], ctx.vocab
        )
        conf[masked], tokens[masked] = row_conf.float(), row_tokens
        if self.threshold is not None:
            return Selection(_select_threshold(conf, masked, self.threshold), tokens, conf)
        if self.schedule == "even":
            counts = llada_transfer_counts(ctx.initial_masked, ctx.steps)[:, ctx.step].tolist()
        else:
            grid = self._grid(ctx.steps)
            counts = [dream_transfer_count(int(n), ctx.step, ctx.steps, grid) for n in masked.sum(-1)]
        if not self.alg_temp:
            transfer = _select_top(conf, torch.tensor(counts), ctx)
        else:
            transfer = torch.zeros_like(masked)
            weights = torch.softmax(conf / self.alg_temp, dim=-1)
            for b, k in enumerate(counts):
                if k > 0:
                    transfer[b, torch.multinomial(weights[b], k)] = True
        return Selection(transfer & masked, tokens, conf)

    def _select_origin(self, mask_logits, masked, ctx, tokens, conf) -> Selection:
        """Dream's "origin": each masked token is revealed with probability 1 - s/t."""
        if ctx.steps is None:
            raise ValueError("alg='origin' needs a fixed number of steps")
        grid = self._grid(ctx.steps)
        t, s = grid[ctx.step], grid[ctx.step + 1]
        p_transfer = 1 - s / t if ctx.step < ctx.steps - 1 else 1.0
        reveal = torch.rand(mask_logits.shape[0], device=mask_logits.device) < p_transfer
        picked = torch.zeros(mask_logits.shape[0], dtype=torch.long, device=mask_logits.device)
        if reveal.any():
            _, picked[reveal] = dream_sample_tokens(
                mask_logits[reveal], self.temperature, self.top_p, self.top_k, shard=ctx.vocab
            )
        transfer = torch.zeros_like(masked)
        transfer[masked] = reveal
        tokens[masked] = picked
        return Selection(transfer, tokens, conf)
