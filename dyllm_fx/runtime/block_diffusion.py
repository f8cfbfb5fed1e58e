"""Block-diffusion generation as LLaDA2's published ``generate`` runs it, over a step function.

The model attends block-causally (blocks of ``block_length`` positions counted from position 0),
so the prompt's last partial block is the first block decoded, and a block's logits never depend
on the blocks after it. The loop, for one prompt (P tokens):

* the canvas is the prompt followed by masks up to a whole number of blocks past P + gen_length;
* blocks P // block_length onwards are decoded left to right, each over ``steps`` steps;
* each step draws a token for every position of the block: the greedy one at temperature 0,
  else a sample of the softmax of the logits divided by the temperature, cut to the ``top_k``
  most likely and then to the ``top_p`` nucleus (torch's global generator, as the published
  ``torch.multinomial``); its confidence is the token's probability under that distribution;
* a step commits every masked token of the block whose confidence is above ``threshold``,
  when they are at least the step's scheduled count (``block_length`` spread evenly over the
  steps, the earlier steps taking the remainder); otherwise the scheduled count of the most
  confident ones;
* after a block that holds an EOS in the response, decoding stops.

The published loop runs the canvas up to the current block's end; here the step function gets
the whole canvas (its length stays fixed over the generation, so a transformed model's caches
last it) and returns the current block's logits: the blocks after it are invisible to it under
the block-causal mask, so the logits are the same. Finished blocks never change again, which is
why a prefix cache (``prefix_cache``) is exact for this model: their K/V is what a full forward
would compute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dyllm_fx.models.spec import DiffusionSpec

from ..values import check_integer, check_number
from .loop import GenerationStats
from .sampling_math import top_k_filter
from .schedule import BlockSchedule
from .step import StepFunction, StepRequest, as_step_output


@dataclass(frozen=True)
class BlockDiffusionSettings:
    """The published generate's settings (``minimal_topk`` 1); ``steps`` are per block, as the
    published ``steps`` argument. ``top_k`` 0 / None and ``top_p`` 1 / None filter nothing;
    both apply only at a temperature above 0 (the greedy token ignores them)."""

    gen_length: int
    block_length: int
    steps: int  # per block
    threshold: float
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @classmethod
    def build(
        cls,
        gen_length,
        block_length,
        steps,
        threshold,
        model_block_length: int,
        temperature=0.0,
        top_k=None,
        top_p=None,
    ) -> "BlockDiffusionSettings":
        """Checked settings; each error names the argument and the value to pass. ``steps`` is
        the total over the response as everywhere in dyllm-fx (a multiple of its blocks; None:
        one token per step) and becomes the steps of each block; ``threshold`` None: 0.95 (the
        published default); ``block_length`` None: the model's, and no other is taken (the
        attention's blocks are the model's)."""
        temperature = check_number("temperature", temperature, minimum=0, hint="; 0 decodes greedily")
        top_k = check_integer("top_k", top_k, minimum=0, allow_none=True, hint="; 0 keeps every token")
        top_p = check_number(
            "top_p", top_p, minimum=0, maximum=1, above=True, allow_none=True, hint="; 1 keeps every token"
        )
        block_length = model_block_length if block_length is None else block_length
        check_integer("block_length", block_length, minimum=1)
        if block_length != model_block_length:
            raise ValueError(
                f"block_length={block_length}: this model attends in blocks of {model_block_length} tokens "
                f"(its config's block_length), so it decodes in those blocks; pass block_length="
                f"{model_block_length} or leave it out"
            )
        schedule = BlockSchedule.build(0, gen_length, block_length, gen_length if steps is None else steps)
        threshold = 0.95 if threshold is None else threshold
        check_number("threshold", threshold, minimum=0, maximum=1, hint="; 0.95 is LLaDA2's default")
        per_block = min(schedule.steps_per_block, schedule.gen_length)  # the published cap
        return cls(schedule.gen_length, block_length, per_block, float(threshold), temperature, top_k, top_p)

    def transfer_counts(self) -> list[int]:
        """Tokens each step of a block commits at least: ``block_length`` spread evenly."""
        base, remainder = divmod(self.block_length, self.steps)
        return [base + (step < remainder) for step in range(self.steps)]


def _keep_top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """``logits`` cut to the nucleus: the most likely tokens, in order, until their probability
    reaches ``p`` (the token that crosses it kept, the most likely always); ``p`` None or 1:
    unchanged. Not ``sampling_math.top_p_filter``: that one compares the cumulative sum minus
    the token's own probability, which can round differently from the published shifted
    cumulative sum used here."""
    if p is None or p >= 1.0:
        return logits
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1)
    drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
    drop_sorted[..., 1:] = cumulative[..., :-1] > p  # the tokens before it already hold more than p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -torch.inf)


def sample_tokens(
    logits: torch.Tensor, settings: BlockDiffusionSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, their probabilities) for ``logits`` (Lb, V): greedy at temperature 0 (the
    probability under the plain softmax), else one draw per row from the tempered, top-k and
    top-p cut softmax (torch's global generator), with its probability under that distribution."""
    if settings.temperature == 0:
        tokens = logits.argmax(dim=-1)
        probs = torch.softmax(logits.float(), dim=-1)
    else:
        scores = logits.float() / settings.temperature
        if settings.top_k:  # 0 / None: every token
            scores = top_k_filter(scores, settings.top_k)
        scores = _keep_top_p(scores, settings.top_p)
        probs = torch.softmax(scores, dim=-1)
        tokens = torch.multinomial(probs, num_samples=1).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def select_llada2(
    logits: torch.Tensor, candidates: torch.Tensor, count: int, settings: BlockDiffusionSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions to commit, drawn tokens) for one row: ``logits`` (Lb, V), ``candidates`` (Lb)
    the masked positions that may be committed. Every candidate whose token's probability is
    above ``settings.threshold`` if they are at least ``count``, else the ``count`` most
    confident candidates."""
    tokens, probs = sample_tokens(logits, settings)
    confidence = torch.where(candidates, probs, -torch.inf)
    high = confidence > settings.threshold
    if int(high.sum()) >= count:
        return high, tokens
    transfer = torch.zeros_like(candidates)
    transfer[torch.topk(confidence, min(count, int(candidates.sum()))).indices] = True
    return transfer & candidates, tokens


def generate_one(
    step_fn: StepFunction, spec: DiffusionSpec, prompt: torch.Tensor, settings: BlockDiffusionSettings
) -> tuple[torch.Tensor, GenerationStats]:
    """Decode one prompt (P,) -> (prompt + ``gen_length`` tokens, stats). A response that
    stopped at an EOS is filled with EOS after that block."""
    plen, block = prompt.shape[0], settings.block_length
    num_blocks = -(-(plen + settings.gen_length) // block)
    mask_id, eos = spec.mask_token_id, set(spec.eos_token_ids)
    x = torch.full((1, num_blocks * block), mask_id, dtype=torch.long, device=prompt.device)
    x[0, :plen] = prompt
    positions = torch.arange(x.shape[1], device=x.device)[None]
    counts = settings.transfer_counts()
    stats, nfe, committed_last = GenerationStats(), 0, 0
    start_time = time.perf_counter()
    for index in range(plen // block, num_blocks):
        start, end = index * block, (index + 1) * block
        step, withheld = 0, False
        # The published loop runs ``steps`` steps at most (a mask id predicted and committed
        # stays a mask). A step function that withheld positions (ES-dLLM) gets up to
        # ``block_length`` more steps to finish the block.
        while (masked := x[0, start:end] == mask_id).any() and (
            step < settings.steps or (withheld and step < settings.steps + block)
        ):
            t0 = time.perf_counter()
            request = StepRequest(
                x, None, positions, index, start, end, step, nfe, committed_last, response_start=plen
            )
            out = as_step_output(step_fn(request))
            nfe += 1
            candidates = masked if out.eligible is None else masked & out.eligible[0]
            withheld |= not torch.equal(candidates, masked)
            if not candidates.any():  # a step function that withheld every mask: commit anyway
                candidates = masked
            # Past the schedule (only when a step function withheld positions): one at least.
            count = counts[step] if step < len(counts) else 1
            stats.extra_steps += step >= len(counts)
            transfer, tokens = select_llada2(out.logits[0], candidates, count, settings)
            x[0, start:end][transfer] = tokens[transfer]
            committed_last = int(transfer.sum())
            stats.step_seconds.append(time.perf_counter() - t0)
            stats.tokens_committed.append(committed_last)
            step += 1
        if eos and any(int(t) in eos for t in x[0, plen:end].tolist()):
            if end < x.shape[1]:
                x[0, end:] = spec.eos_token_ids[0]
                stats.stopped_early_at_block = index
            break
    stats.nfe = nfe
    stats.seconds = time.perf_counter() - start_time
    return x[0, : plen + settings.gen_length], stats


__all__ = ["BlockDiffusionSettings", "generate_one", "sample_tokens", "select_llada2"]
