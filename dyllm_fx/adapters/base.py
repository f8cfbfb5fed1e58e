"""The interface every model family implements to plug into the compiler and the runtime."""

from __future__ import annotations

import torch
from torch import nn

from ..models.spec import DiffusionSpec
from ..passes.capture import CapturedGraph
from ..passes.pipeline import PASSES
from ..passes.split_pieces import StepProgram
from ..runtime.policies import Policy, make_policy


class ModelAdapter:
    """How one model family connects to the passes and the runtime.

    * detection: :meth:`matches` (the registry asks each adapter in turn);
    * the trace layout: :meth:`capture` (what is traced as the step, with which example
      inputs; extra step inputs are the captured graph's ``input_names`` beyond the three);
    * the transformed module and its step inputs: :meth:`build`;
    * generation: ``runs_own_loop`` False means ``dyllm_fx.generate``'s denoising loop with the
      LLaDA / Dream samplers; True means :meth:`generate` runs the family's own loop;
    * the dynamo backend: :meth:`dynamo_backend`.

    :meth:`transform` is the same for every family: policy, capture, the pass pipeline, build.
    """

    name: str = "adapter"
    runs_own_loop: bool = False

    def matches(self, model: nn.Module | None) -> bool:
        raise NotImplementedError

    def diffusion_spec(self, model: nn.Module, given: DiffusionSpec | None) -> DiffusionSpec | None:
        """The spec (mask token id, logit shift) the transformed module runs with."""
        return given

    def policy_family(self, spec: DiffusionSpec | None) -> str | None:
        """The family whose presets a named policy takes (``runtime/policies/presets.py``)."""
        raise NotImplementedError

    def check_policy(self, policy: Policy) -> None:
        """Refuse a policy the family cannot run, before the trace."""

    def capture(self, model: nn.Module) -> tuple[CapturedGraph, tuple[torch.Tensor, ...]]:
        """The captured step of ``model`` and the example inputs it was traced with."""
        raise NotImplementedError

    def build(self, program: StepProgram, policy: Policy, model: nn.Module, spec, **options) -> nn.Module:
        """The transformed module running ``program`` under ``policy``."""
        raise NotImplementedError

    def transform(
        self,
        model: nn.Module,
        policy: str | Policy,
        spec: DiffusionSpec | None = None,
        compile: bool | str = False,
        cuda_graphs: bool = False,
        **policy_config,
    ) -> nn.Module:
        """``dyllm_fx.transform`` for this family (the arguments are checked by the caller)."""
        spec = self.diffusion_spec(model, spec)
        chosen = make_policy(policy, family=self.policy_family(spec), **policy_config)
        self.check_policy(chosen)  # bad parameters fail before the trace
        captured, inputs = self.capture(model)
        program = PASSES.run(captured, inputs)
        chosen.check_model(len(program.attn))
        return self.build(program, chosen, model, spec, compile=compile, cuda_graphs=cuda_graphs)

    def generate(self, model: nn.Module, tokenizer, prompts, **settings):
        """The family's own generation (only when ``runs_own_loop``)."""
        raise TypeError(f"{self.name} models run dyllm_fx.generate's denoising loop")

    def dynamo_backend(self, module: nn.Module | None, gm, example_inputs: list, options: dict):
        """The callable the ``dyllm`` backend returns for a graph dynamo traced from ``module``."""
        raise NotImplementedError


__all__ = ["ModelAdapter"]
