"""Drive an exported step from the denoising loop: the host side of a layer-uniform step.

The exported graph (``step_module.ExportableStep``) computes one step for a given row set and
returns its caches. This module supplies what the graph leaves to the host, for any backend
that can run it (onnxruntime, a TensorRT-compiled module, the eager module itself):

* the policy (the project's own ``Policy`` objects): it picks this step's rows, every row on a
  cold cache (the first step of a generation);
* the caches between steps, in whatever form the backend keeps them (on its device);
* the runtime's step contract (``runtime.step.StepRequest`` in, block logits out), so
  ``dyllm_fx.generate`` and its samplers run on top unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from dyllm_fx.runtime.policies import HostState, Policy, make_policy
from dyllm_fx.runtime.policies.uniform import plan_rows
from dyllm_fx.runtime.step import StepRequest

from .metadata import StepGraphInfo
from .step_module import check_layer_uniform


class StepBackend(Protocol):
    """Runs an exported step; caches stay in the backend's own form between calls."""

    def zeros(self, shape: Sequence[int], dtype: str) -> Any:
        """A zero cache tensor (``dtype`` a torch dtype name such as ``"float32"``)."""
        ...

    def run(self, inputs: dict[str, torch.Tensor], caches: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """One step: host int64 inputs by name and the caches in input order -> (logits on the
        host, updated caches)."""
        ...


def cache_layout(info: StepGraphInfo, batch: int, seq_len: int) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of ``hidden`` then of K and V per layer, in the graph's input order."""
    layout = [((batch, seq_len, info.hidden_size), info.hidden_dtype)]
    for k_shape, v_shape in info.kv_shapes:
        layout.append(((batch, k_shape[0], seq_len, k_shape[1]), info.kv_dtype))
        layout.append(((batch, v_shape[0], seq_len, v_shape[1]), info.kv_dtype))
    return layout


def build_policy(info: StepGraphInfo, policy: str | Policy | None) -> Policy:
    """The policy the graph was exported with (from its metadata), or the one given."""
    if policy is None:
        policy = make_policy(info.policy, **info.policy_config)
    elif isinstance(policy, str):
        policy = make_policy(policy)
    check_layer_uniform(policy)
    return policy


class TorchBackend:
    """Runs a torch callable with the exported step's signature (the eager ``ExportableStep``,
    or a compiled one such as TensorRT's); caches are torch tensors on ``device``."""

    def __init__(self, step, device: torch.device | str):
        self.step = step
        self.device = torch.device(device)

    def zeros(self, shape: Sequence[int], dtype: str) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=getattr(torch, dtype), device=self.device)

    def run(self, inputs: dict[str, torch.Tensor], caches: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        args = [t.to(self.device) for t in inputs.values()]  # in the graph's input order
        with torch.no_grad():
            logits, *caches = self.step(*args, *caches)
        return logits.cpu(), caches


class UniformStep:
    """The runtime's step function over an exported layer-uniform step.

    ``active_rows`` lists the row count of every step so far (all rows on a cold cache).
    """

    def __init__(self, backend: StepBackend, info: StepGraphInfo, policy: Policy):
        self.backend = backend
        self.info = info
        self.policy = policy
        self.caches: list[Any] | None = None
        self.cache_size: tuple[int, int] | None = None
        self.active_rows: list[int] = []
        self.response_start: int | None = None

    def __call__(self, request: StepRequest) -> torch.Tensor:
        ids = request.input_ids.cpu()
        bsz, seq_len = ids.shape
        cold = request.nfe == 0 or self.cache_size != (bsz, seq_len)
        if request.nfe == 0:
            self.response_start = request.block_start  # the first block starts at the prompt's end
        if cold:
            self.caches = [self.backend.zeros(shape, dtype) for shape, dtype in cache_layout(self.info, bsz, seq_len)]
            self.cache_size = (bsz, seq_len)
        mask = torch.ones_like(ids) if request.attention_mask is None else request.attention_mask.cpu().long()
        host = HostState(
            ids, mask, cold, len(self.info.kv_shapes), step=request.nfe, block_start=request.block_start,
            block_end=request.block_end, response_start=self.response_start, mask_token_id=self.info.spec.mask_token_id,
            logits_shift=self.info.spec.logits_shift,
        )
        rows = plan_rows(self.policy.plan(host), bsz, seq_len, ids.device)
        shift = self.info.spec.logits_shift
        positions = torch.arange(request.block_start - shift, request.block_end - shift).expand(bsz, -1)
        inputs = {
            "input_ids": ids, "attention_mask": mask, "position_ids": request.position_ids.cpu(),
            "rows": rows.cpu(), "logit_positions": positions,
        }
        inputs = {name: t.to(torch.long).contiguous() for name, t in inputs.items()}
        logits, self.caches = self.backend.run(inputs, self.caches)
        self.active_rows.append(int(rows.shape[1]))
        return logits.to(request.input_ids.device)


class ExportedStepModel(nn.Module):
    """An exported step wrapped so ``dyllm_fx.generate(model, tokenizer, prompts)`` runs it.

    ``generate`` reads ``diffusion`` (the spec), calls ``make_step_function()`` and puts the
    prompt on the device of the module's tensors. The only tensor here is an empty host
    buffer: the backends take host inputs and keep just the caches on their own device. The
    backend is deliberately not a submodule, so its weights (possibly on a GPU) stay out of
    ``parameters()``.
    """

    def __init__(self, backend: StepBackend, info: StepGraphInfo, policy: Policy):
        super().__init__()
        self.backend = backend
        self.info = info
        self.policy = policy
        self.diffusion = info.spec
        self.register_buffer("host", torch.empty(0), persistent=False)
        self.last_step: UniformStep | None = None

    def make_step_function(self) -> UniformStep:
        self.last_step = UniformStep(self.backend, self.info, self.policy)
        return self.last_step

    def forward(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} runs denoising steps, not forward passes; "
            "call dyllm_fx.generate(model, tokenizer, prompts)"
        )


__all__ = ["ExportedStepModel", "StepBackend", "TorchBackend", "UniformStep", "build_policy", "cache_layout"]
