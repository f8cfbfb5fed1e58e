"""The default adapter: LLaDA, Dream and any module built like them.

A model called as ``model(input_ids, attention_mask=..., position_ids=...)`` with bidirectional
SDPA attention and a ``diffusion`` spec (mask token id, logit shift). Its step is one denoising
forward over the whole sequence; its generation is ``dyllm_fx.generate``'s denoising loop with
LLaDA's or Dream's sampler (chosen by the spec's logit shift).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.spec import DiffusionSpec
from ..passes.capture import CapturedGraph, capture_module, example_inputs
from ..passes.split_pieces import StepProgram
from ..runtime.policies import Policy, family_of
from .base import ModelAdapter
from .llada_dream_dynamo import dynamo_step
from .transformed import TransformedModel


class LLaDADreamAdapter(ModelAdapter):
    """LLaDA / Dream / a bidirectional transformers model: the fallback every model matches."""

    name = "LLaDA / Dream"

    def matches(self, model: nn.Module | None) -> bool:
        return True

    def diffusion_spec(self, model: nn.Module, given: DiffusionSpec | None) -> DiffusionSpec | None:
        return given or getattr(model, "diffusion", None)

    def policy_family(self, spec: DiffusionSpec | None) -> str | None:
        return family_of(spec)

    def capture(
        self, model: nn.Module, device: torch.device | None = None
    ) -> tuple[CapturedGraph, tuple[torch.Tensor, ...]]:
        captured = capture_module(model)
        device = device if device is not None else next(model.parameters()).device
        return captured, tuple(t.to(device) for t in example_inputs())

    def build(
        self, program: StepProgram, policy: Policy, model: nn.Module | None, spec, **options
    ) -> TransformedModel:
        return TransformedModel(program, policy, spec, **options)

    def dynamo_backend(self, module, gm, example_inputs, options):
        return dynamo_step(self, module, gm, example_inputs, options)


__all__ = ["LLaDADreamAdapter"]
