"""The denoising loop: blocks left to right, a step function for logits, a sampler to commit."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dyllm_fx.models.layers import default_position_ids
from dyllm_fx.models.spec import DiffusionSpec

from .policies import StepOutput
from .samplers import StepContext
from .schedule import BlockSchedule
from .step import StepFunction, StepRequest, as_step_output


@dataclass
class GenerationStats:
    """Per-generation counters. ``tokens_per_second`` counts response-window positions
    decoded per second (B x gen_length / seconds), as Fast-dLLM and the DyLLM paper report."""

    nfe: int = 0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    tokens_committed: list[int] = field(default_factory=list)  # per step, summed over the batch
    stopped_early_at_block: int | None = None
    tokens_per_second: float = 0.0
    cache_bytes: int = 0  # bytes of the transformed model's step cache (0 for a dense model)
    # per step, for step functions that select rows with a capacity (DyLLM): the capacity and
    # the rows that qualified beyond it (approximated instead), summed over layers and batch
    capacity: list[int] = field(default_factory=list)
    overflow: list[int] = field(default_factory=list)
    # steps run after a block's scheduled steps because masks were left: only step functions
    # that restrict which positions may be committed (ES-dLLM) can cause them
    extra_steps: int = 0


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, P + G) prompt (left padded) + response
    prompt_length: int
    stats: GenerationStats
    texts: list[str] = field(default_factory=list)  # decoded responses, cut at the first EOS

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]


def denoise(
    step_fn: StepFunction,
    sampler,
    spec: DiffusionSpec,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    schedule: BlockSchedule,
    cfg_scale: float = 0.0,
    stop_at_eos: bool = True,
    progress: bool | None = None,
) -> GenerationOutput:
    """Decode ``schedule.gen_length`` tokens after ``prompt_ids`` (B, P), left padded.

    ``stop_at_eos``: once every row has an EOS in the decoded part and its blocks before it are
    complete, the rest of the response is filled with EOS and no more steps run (the text is
    cut at the first EOS anyway).
    """
    bsz, plen = prompt_ids.shape
    device = prompt_ids.device
    mask_id = spec.mask_token_id
    x = torch.cat(
        [prompt_ids, torch.full((bsz, schedule.gen_length), mask_id, dtype=torch.long, device=device)], 1
    )
    attn = None
    if prompt_mask is not None:
        attn = torch.cat(
            [prompt_mask.long(), torch.ones(bsz, schedule.gen_length, dtype=torch.long, device=device)], 1
        )
    pos = default_position_ids(x, attn)
    stats = GenerationStats()
    total_steps = schedule.num_blocks * (schedule.steps_per_block or schedule.block_length)
    if progress is None:
        progress = sys.stderr.isatty() and total_steps >= 64
    bar = tqdm(total=total_steps, disable=not progress, desc="denoising", unit="step", leave=False)
    start_time = time.perf_counter()
    last = (
        0,
        None,
    )  # (most tokens any row committed, each row's leftmost committed position) at the last step
    try:
        for block in range(schedule.num_blocks):
            start, end = schedule.block_bounds(block)
            masked = x[:, start:end] == mask_id
            initial = masked.sum(-1)
            step = 0
            restricted = False  # whether the step function withheld positions in this block
            while _block_continues(schedule, step, masked, restricted):
                t0 = time.perf_counter()
                request = StepRequest(x, attn, pos, block, start, end, step, stats.nfe, *last)
                result = (
                    _guided(step_fn, request, cfg_scale, plen, mask_id)
                    if cfg_scale
                    else as_step_output(step_fn(request))
                )
                # ES-dLLM: only rows that ran every layer may be committed
                allowed = masked if result.eligible is None else masked & result.eligible
                restricted |= result.eligible is not None
                extra = schedule.steps_per_block is not None and step >= schedule.steps_per_block
                ctx = StepContext(
                    _schedule_step(schedule, step), schedule.steps_per_block, initial, start, x.shape[1]
                )
                chosen = sampler.select(result.logits, allowed, ctx)
                transfer = chosen.transfer & allowed
                if extra and not transfer.any():  # past the schedule: commit the best allowed token
                    transfer = _best_allowed(chosen.confidence, allowed)
                x[:, start:end] = torch.where(transfer, chosen.tokens, x[:, start:end])
                masked = x[:, start:end] == mask_id
                stats.nfe += 1 + (cfg_scale > 0)
                stats.step_seconds.append(time.perf_counter() - t0)
                most, leftmost, total = _commit_summary(transfer, start)
                last = (most, leftmost)
                stats.tokens_committed.append(total)
                if result.report is not None:
                    stats.capacity.append(result.report.capacity)
                    stats.overflow.append(result.report.overflow)
                stats.extra_steps += extra
                step += 1
                bar.update(1)
            if stop_at_eos and block < schedule.num_blocks - 1 and _all_rows_ended(x[:, plen:end], spec):
                x[:, end:] = spec.eos_token_ids[0]
                stats.stopped_early_at_block = block
                break
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start_time
    stats.tokens_per_second = bsz * schedule.gen_length / max(stats.seconds, 1e-9)
    return GenerationOutput(sequences=x, prompt_length=plen, stats=stats)


def _block_continues(schedule: BlockSchedule, step: int, masked: torch.Tensor, restricted: bool) -> bool:
    """Threshold decoding runs until the block is decoded (each step commits at least one token,
    so a block length of steps suffices; the cap of twice that stops a model that keeps
    predicting the mask token itself). A fixed schedule runs its steps; a step function that
    withheld positions (ES-dLLM: rows that skipped layers) may have left masks the schedule
    meant to commit, so then the block continues while masks are left, for at most another
    block length of steps."""
    if schedule.steps_per_block is None:
        return step < 2 * schedule.block_length and bool(masked.any())
    if step < schedule.steps_per_block:
        return True
    return restricted and step < schedule.steps_per_block + schedule.block_length and bool(masked.any())


def _schedule_step(schedule: BlockSchedule, step: int) -> int:
    """The step index the sampler's schedule sees: steps past the schedule count as its last."""
    return step if schedule.steps_per_block is None else min(step, schedule.steps_per_block - 1)


def _commit_summary(transfer: torch.Tensor, start: int) -> tuple[int, tuple[int | None, ...], int]:
    """(most tokens any row committed, per row the leftmost committed position or None, total
    committed), read from the device in one transfer."""
    per_row = transfer.sum(-1)
    width = transfer.shape[1]
    cols = torch.arange(width, device=transfer.device)
    left = torch.where(transfer, cols, width).amin(-1)
    most, total, *leftmost = torch.cat([torch.stack([per_row.amax(), per_row.sum()]), left]).tolist()
    return most, tuple(start + c if c < width else None for c in leftmost), total


def _best_allowed(confidence: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The most confident allowed position of every row that has one."""
    score = torch.where(allowed, confidence.float(), float("-inf"))
    best = torch.zeros_like(allowed).scatter_(1, score.argmax(-1, keepdim=True), True)
    return best & allowed


def _all_rows_ended(decoded: torch.Tensor, spec: DiffusionSpec) -> bool:
    if not spec.eos_token_ids:
        return False
    is_eos = torch.isin(decoded, torch.tensor(spec.eos_token_ids, device=decoded.device))
    return bool(is_eos.any(dim=-1).all())


def _guided(step_fn: StepFunction, request: StepRequest, cfg_scale: float, plen: int, mask_id: int):
    """LLaDA's classifier-free guidance: the unconditional branch sees the prompt masked."""
    x = request.input_ids
    uncond = x.clone()
    uncond[:, :plen] = mask_id
    both = StepRequest(
        torch.cat([x, uncond]),
        None if request.attention_mask is None else request.attention_mask.repeat(2, 1),
        request.position_ids.repeat(2, 1),
        request.block,
        request.block_start,
        request.block_end,
        request.step_in_block,
        request.nfe,
        request.last_committed,
        request.last_leftmost,
    )
    out = as_step_output(step_fn(both))
    cond, uncond_logits = out.logits.chunk(2)
    eligible = None if out.eligible is None else out.eligible.chunk(2)[0] & out.eligible.chunk(2)[1]
    return StepOutput(uncond_logits + (cfg_scale + 1) * (cond - uncond_logits), eligible, report=out.report)
