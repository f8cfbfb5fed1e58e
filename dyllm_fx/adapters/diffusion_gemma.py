"""The DiffusionGemma adapter: transformers' ``DiffusionGemmaForBlockDiffusion`` on the engine.

DiffusionGemma is a block-diffusion model. Its generation (``generate()`` in transformers'
``generation_diffusion_gemma.py``) is an autoregressive loop over *canvases* of
``canvas_length`` tokens:

* the encoder (causal, Gemma 4's text stack) runs the prompt, and later each finished canvas,
  into a K/V cache: one growing prefix per layer (a sliding-window layer keeps its last
  ``sliding_window - 1`` keys);
* the decoder (the same weights, bidirectional) denoises the canvas over up to
  ``max_denoising_steps`` steps, attending to [that prefix ; the canvas], with
  self-conditioning on the previous step's logits.

So the encoder's cache already is a prefix cache, and what repeats is the decoder over the
canvas. That is what is traced as the sparse step: the canvas, its positions, the
self-conditioning logits, per layer type a key mask, and per layer the encoder's K/V prefix
(``diffusion_gemma_layout.py`` lays the step's inputs out).

The engine's rows are the canvas; the prefix K/V and the key masks are tables every attention
piece reads whole, and ``passes/attention_operands.py`` recognises the decoder's
``cat([cache, new])`` so the step cache holds the canvas rows with the same prefix in front.
The first step of a canvas (no self-conditioning logits yet) starts a new generation in the
engine (every row computed); the next steps are warm. Self-conditioning moves every row's
input at every step, which the program records (``h0_reads_state``), so DyLLM starts each
layer-0 from every row, as the official engine does for DiffusionGemma.

:class:`TransformedDiffusionGemma` (``diffusion_gemma_model.py``) keeps transformers'
interface: its ``forward`` takes the model's keyword arguments (the encoder runs as before when
``input_ids`` are given; the decoder is the engine's step) and its ``generate`` is transformers' own
``DiffusionGemmaGenerationMixin.generate``. ``dyllm_fx.generate`` runs the same loop with this
project's sampler (``runtime/canvas.py``, through ``diffusion_gemma_generation.py``), and
``torch.compile(model, backend="dyllm")`` goes through ``diffusion_gemma_dynamo.py``.

Limits: the dynamic cache only (transformers' default; a static cache lays the canvas out
differently), text only (no ``pixel_values``), and decoder masks that are key masks (every
canvas row sees the same keys: transformers' decoder masks are).
"""

from __future__ import annotations

from torch import nn

from ..errors import MethodNotApplicable
from ..passes.split_pieces import StepProgram
from ..runtime.policies import Policy
from . import diffusion_gemma_dynamo, diffusion_gemma_generation
from .base import ModelAdapter
from .diffusion_gemma_layout import StepLayout, capture_step


class DiffusionGemmaAdapter(ModelAdapter):
    """transformers' DiffusionGemma block-diffusion model (untransformed or transformed)."""

    name = "DiffusionGemma"
    runs_own_loop = True  # block diffusion over canvases, with its own sampler

    def matches(self, model: nn.Module | None) -> bool:
        cfg = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        return (
            getattr(cfg, "model_type", None) == "diffusion_gemma"
            and hasattr(inner, "decoder")
            and hasattr(inner, "encoder")
        )

    def policy_family(self, spec) -> str:
        return "diffusion_gemma"

    def check_policy(self, policy: Policy) -> None:
        if "es_dllm" in policy.name.split("+"):
            raise MethodNotApplicable(
                "es_dllm scores rows by the confidence of their masked tokens, and DiffusionGemma has no "
                "mask token (its canvas is renoised with random tokens); use policy='dyllm' (saliency), "
                "'dllm_cache' or 'dense'"
            )

    def capture(self, model: nn.Module):
        captured, _, inputs = capture_step(model)
        return captured, inputs

    def build(self, program: StepProgram, policy: Policy, model: nn.Module, spec, **options) -> nn.Module:
        # imported here: it subclasses transformers' generation mixin, and transformers is
        # imported only when a DiffusionGemma model is used
        from .diffusion_gemma_model import TransformedDiffusionGemma

        return TransformedDiffusionGemma(program, policy, model, StepLayout(model), **options)

    def generate(self, model: nn.Module, tokenizer, prompts, **settings):
        return diffusion_gemma_generation.generate(model, tokenizer, prompts, **settings)

    def dynamo_backend(self, module, gm, example_inputs, options):
        return diffusion_gemma_dynamo.dynamo_step(self, module, gm, options)


__all__ = ["DiffusionGemmaAdapter"]
