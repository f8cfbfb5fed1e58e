"""The denoising loop: blocks left to right, a step function for logits, a sampler to commit."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dyllm_fx.models.spec import DiffusionSpec

from .block_decoder import BlockDecoder, sampler_select
from .policies import StepOutput
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
    decoder = BlockDecoder(mask_id, schedule.block_length, schedule.steps_per_block)
    decoder.lay_out(x, attn, response_start=plen)
    if cfg_scale:
        step_fn = Guided(step_fn, cfg_scale, plen, mask_id)
    select = sampler_select(sampler, spec.vocab_shard)
    evaluations = 1 + (cfg_scale > 0)
    stats = GenerationStats()
    total_steps = schedule.num_blocks * (schedule.steps_per_block or schedule.block_length)
    if progress is None:
        progress = sys.stderr.isatty() and total_steps >= 64
    bar = tqdm(total=total_steps, disable=not progress, desc="denoising", unit="step", leave=False)
    start_time = time.perf_counter()
    try:
        for block in range(schedule.num_blocks):
            decoder.begin_block(block, schedule.block_bounds(block)[0])
            while decoder.block_continues():
                t0 = time.perf_counter()
                done = decoder.step(step_fn, select, evaluations)
                stats.step_seconds.append(time.perf_counter() - t0)
                stats.tokens_committed.append(done.committed)
                if done.output.report is not None:
                    stats.capacity.append(done.output.report.capacity)
                    stats.overflow.append(done.output.report.overflow)
                stats.extra_steps += done.past_schedule
                bar.update(1)
            end = decoder.end
            if stop_at_eos and block < schedule.num_blocks - 1 and _all_rows_ended(x[:, plen:end], spec):
                x[:, end:] = spec.eos_token_ids[0]
                stats.stopped_early_at_block = block
                break
    finally:
        bar.close()
    stats.nfe = decoder.nfe
    stats.seconds = time.perf_counter() - start_time
    stats.tokens_per_second = bsz * schedule.gen_length / max(stats.seconds, 1e-9)
    return GenerationOutput(sequences=x, prompt_length=plen, stats=stats)


def _all_rows_ended(decoded: torch.Tensor, spec: DiffusionSpec) -> bool:
    if not spec.eos_token_ids:
        return False
    is_eos = torch.isin(decoded, torch.tensor(spec.eos_token_ids, device=decoded.device))
    return bool(is_eos.any(dim=-1).all())


class Guided:
    """LLaDA's classifier-free guidance around a step function: the unconditional branch sees
    the prompt masked; both branches run as one batch of twice the rows."""

    def __init__(self, step_fn: StepFunction, cfg_scale: float, prompt_length: int, mask_token_id: int):
        self.step_fn = step_fn
        self.cfg_scale = cfg_scale
        self.prompt_length = prompt_length
        self.mask_token_id = mask_token_id

    def __call__(self, request: StepRequest) -> StepOutput:
        x = request.input_ids
        uncond = x.clone()
        uncond[:, : self.prompt_length] = self.mask_token_id
        attn = request.attention_mask
        both = dataclasses.replace(
            request,
            input_ids=torch.cat([x, uncond]),
            attention_mask=None if attn is None else attn.repeat(2, 1),
            position_ids=request.position_ids.repeat(2, 1),
        )
        out = as_step_output(self.step_fn(both))
        cond, uncond_logits = out.logits.chunk(2)
        eligible = None if out.eligible is None else out.eligible.chunk(2)[0] & out.eligible.chunk(2)[1]
        logits = uncond_logits + (self.cfg_scale + 1) * (cond - uncond_logits)
        return StepOutput(logits, eligible, report=out.report)
