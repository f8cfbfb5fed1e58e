"""The LLaDA2 adapter: a block-diffusion model traced and transformed as LLaDA is, generated
with LLaDA2's own block loop and sampler (``runtime/block_diffusion.py``: greedy, or temperature
with top-k / top-p).

The trace is the default adapter's: ``model(input_ids, attention_mask, position_ids)``, whose
prologue builds the block-causal mask from the positions, a full (B, 1, L, L) mask every
attention piece reads for its rows (the pass that refuses causal attention lets it through: a
query sees the later keys of its own block). Generation runs each prompt on its own, as the
published ``generate`` does (its blocks are counted from the prompt's first token, so prompts of
different lengths have their blocks at different columns).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..errors import UsageError
from ..models.checks import check_model_tensors
from ..prompts import encode_prompts
from ..runtime.block_diffusion import BlockDiffusionSettings, generate_one
from ..runtime.loop import GenerationOutput, GenerationStats
from ..runtime.step import DenseStep
from .llada_dream import LLaDADreamAdapter
from .transformed import TransformedModel

# dyllm_fx.generate()'s default block_length: left as it is, the model's own block is used.
GENERATE_BLOCK_LENGTH = 32
SAMPLING = ("temperature", "top_k", "top_p")  # the published generate's sampler arguments


def attention_block_length(model: nn.Module | None) -> int | None:
    """The block of a block-causal model (LLaDA2, or a module transformed from one); None otherwise."""
    return getattr(model, "attention_block_length", None)


class LLaDA2Adapter(LLaDADreamAdapter):
    """LLaDA2 (untransformed or transformed): LLaDA's trace and policies, its own loop."""

    name = "LLaDA2"
    runs_own_loop = True

    def matches(self, model: nn.Module | None) -> bool:
        return attention_block_length(model) is not None

    def build(self, program, policy, model, spec, **options) -> TransformedModel:
        module = super().build(
            program, policy, model, spec, block_length=model.attention_block_length, **options
        )
        module.attention_block_length = model.attention_block_length
        return module

    def generate(
        self,
        model: nn.Module,
        tokenizer,
        prompts,
        max_new_tokens=None,
        block_length=None,
        steps=None,
        threshold=None,
        cfg_scale=0.0,
        chat=False,
        seed=None,
        sampler=None,
        **sampler_params,
    ) -> GenerationOutput:
        """``dyllm_fx.generate`` for LLaDA2: LLaDA2's threshold / low-confidence rule per block
        (``steps`` per block, ``threshold`` default 0.95) over its sampler (greedy at
        ``temperature`` 0, else ``temperature``, ``top_k``, ``top_p`` as the published
        ``generate``; ``seed`` seeds torch's generator), every setting checked first. The block
        is the model's: ``block_length`` None or generate()'s default 32 take it, another value
        is refused."""
        for name, value, unset in (("cfg_scale", cfg_scale, 0.0), ("sampler", sampler, None)):
            if value != unset:
                raise UsageError(f"{name}= does not apply to LLaDA2's block loop; leave it out")
        sampling = {k: sampler_params.pop(k) for k in SAMPLING if k in sampler_params}
        if sampler_params:
            raise UsageError(
                "LLaDA2's block loop takes gen_length, block_length, steps, threshold, temperature, top_k, "
                f"top_p and seed; drop {sorted(sampler_params)}"
            )
        spec = model.diffusion
        settings = BlockDiffusionSettings.build(
            64 if max_new_tokens is None else max_new_tokens,
            None if block_length == GENERATE_BLOCK_LENGTH else block_length,
            steps,
            threshold,
            attention_block_length(model),
            **sampling,
        )
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or any(not isinstance(p, str) or not p for p in prompts):
            raise ValueError("prompts must be a non-empty string or a list of non-empty strings")
        device = check_model_tensors(model)
        _, ids, mask = encode_prompts(tokenizer, prompts, chat, device)
        if seed is not None:
            torch.manual_seed(seed)
        make_step = getattr(model, "make_step_function", None)
        stats, rows, texts = GenerationStats(), [], []
        start_time = time.perf_counter()
        with torch.inference_mode():
            for prompt_ids, real in zip(ids, mask.bool()):
                step_fn = make_step() if callable(make_step) else DenseStep(model, spec)
                prompt = prompt_ids[real]
                row, one = generate_one(step_fn, spec, prompt, settings)
                response = row[prompt.shape[0] :]
                rows.append(torch.cat([prompt_ids, response]))
                texts.append(_decode(tokenizer, response.tolist(), spec))
                stats.nfe += one.nfe
                stats.step_seconds += one.step_seconds
                stats.tokens_committed += one.tokens_committed
                stats.extra_steps += one.extra_steps
        stats.seconds = time.perf_counter() - start_time
        stats.tokens_per_second = len(rows) * settings.gen_length / max(stats.seconds, 1e-9)
        stats.cache_bytes = int(getattr(model, "allocated_nbytes", 0) or 0)
        return GenerationOutput(torch.stack(rows), ids.shape[1], stats, texts)


def _decode(tokenizer, ids: list[int], spec) -> str:
    """The response up to its first EOS, special tokens dropped."""
    eos = set(spec.eos_token_ids)
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


__all__ = ["LLaDA2Adapter", "attention_block_length"]
