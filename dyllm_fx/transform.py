"""``dyllm_fx.transform``: run the compiler passes on a model and return the sparse-step module."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .generation import check_model_tensors
from .models.layers import default_position_ids
from .models.spec import DiffusionSpec
from .errors import UsageError
from .passes.capture import CapturedGraph, capture_module, example_inputs
from .passes.check_bidirectional import check_bidirectional
from .passes.find_blocks import find_blocks
from .passes.rewrite_attention import rewrite_attention
from .passes.split_attention import split_attention
from .passes.split_pieces import StepProgram, split_pieces
from .runtime.cache import StepCache
from .runtime.policies import Policy, make_policy
from .runtime.sparse_step import SparseStepEngine
from .runtime.step import StepRequest


def build_program(captured: CapturedGraph) -> StepProgram:
    """The pass pipeline: find blocks -> split into row pieces -> cut each attention at its core
    (kept for DyLLM-style layers) -> rewrite the cores into cache-backed partial attention."""
    program = split_pieces(captured, find_blocks(captured.gm))
    program.attn_parts = [split_attention(piece) for piece in program.attn]
    for piece in program.attn:
        rewrite_attention(piece)
    return program


def inductor(gm: torch.fx.GraphModule) -> Callable:
    """Compile one piece with inductor; each bucket width is one static-shape graph."""
    return torch.compile(gm, backend="inductor", dynamic=False)


class TransformedModel(nn.Module):
    """A dLLM rewritten into a cache-backed, token-sparse step.

    ``forward(input_ids, attention_mask, position_ids)`` keeps the original signature and
    returns logits for every position (the cache persists across calls of one generation).
    The denoising loop instead calls ``make_step_function()``, whose steps compute the LM head
    only for the current block.
    """

    def __init__(
        self, program: StepProgram, policy: Policy, spec: DiffusionSpec | None, compile: bool = False,
        cuda_graphs: bool = False,
    ):
        super().__init__()
        self.program = program
        self.diffusion = spec
        self.engine = SparseStepEngine(program, policy, inductor if compile else None)
        self.engine.cuda_graphs = cuda_graphs
        self.engine.mask_token_id = spec.mask_token_id if spec is not None else None
        # Registered so .parameters() / .to() see the shared weights once.
        self.pieces = nn.ModuleList([program.prologue, *(p.gm for p in program.attn), *(p.gm for p in program.mlp), program.epilogue.gm])
        self._last_ids: torch.Tensor | None = None
        self.eval()  # an inference module, like the eval-mode model it was traced from

    def _apply(self, fn, recurse=True):
        # The traced pieces and the engine's caches are fixed to the traced dtype: a cast
        # would fail deep inside the first step. Refuse it here, naming the way that works.
        params = [p for p in self.parameters() if p.is_floating_point()]
        if params:
            probe = torch.empty(0, dtype=params[0].dtype, device=params[0].device)
            after = fn(probe)
            if isinstance(after, torch.Tensor) and after.dtype != probe.dtype:
                raise UsageError(
                    f"a TransformedModel is traced in {probe.dtype} and cannot be cast to {after.dtype}; cast the "
                    f"original model and transform it again: dyllm_fx.transform(model.to({after.dtype}), policy=...)"
                )
        return super()._apply(fn, recurse)

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    @property
    def cache(self) -> StepCache | None:
        return self.engine.cache

    def cache_nbytes(self, batch: int, seq_len: int) -> int:
        """Bytes of cache a generation of this batch x sequence length allocates: K/V and hidden
        states per layer, plus the policy's MLP-output and attention-context caches."""
        return self.engine.predicted_nbytes(batch, seq_len)

    @property
    def allocated_nbytes(self) -> int:
        """Bytes the engine's caches hold now (0 before the first step)."""
        return self.engine.allocated_nbytes

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if input_ids.is_floating_point() or input_ids.is_complex():
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; pass ids.long()")
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        if not self._continues(input_ids):
            self.engine.reset()
        self._last_ids = input_ids.clone()
        return self.engine.step(input_ids, attention_mask, position_ids, None)

    def _continues(self, input_ids: torch.Tensor) -> bool:
        """Same generation iff no already-decoded token changed (tokens only go mask -> token)."""
        last = self._last_ids
        if last is None or last.shape != input_ids.shape or self.diffusion is None:
            return False
        decoded = last != self.diffusion.mask_token_id
        return bool((last[decoded] == input_ids[decoded]).all())

    def make_step_function(self) -> "SparseStep":
        if self.diffusion is None:
            raise TypeError("this model has no `diffusion` spec; pass spec=DiffusionSpec(...) to transform()")
        return SparseStep(self)

    def explain(self) -> str:
        from .explain import explain

        return explain(self)

    def print_graph(self) -> None:
        print(self.explain())


class SparseStep:
    """The runtime's step function over a TransformedModel (see runtime.step.StepFunction)."""

    def __init__(self, model: TransformedModel):
        self.model = model
        self.engine = model.engine
        self.response_start: int | None = None

    def __call__(self, request: StepRequest) -> torch.Tensor:
        if request.nfe == 0:
            self.engine.reset()  # a new generation: nothing cached is valid
            self.model._last_ids = None  # nor for a later forward() call
            self.response_start = request.block_start  # the first block starts at the prompt's end
        shift = self.model.diffusion.logits_shift
        positions = torch.arange(request.block_start - shift, request.block_end - shift, device=request.input_ids.device)
        positions = positions.expand(request.input_ids.shape[0], -1)
        return self.engine.step(
            request.input_ids, request.attention_mask, request.position_ids, positions,
            request.nfe, (request.block_start, request.block_end), self.response_start,
        )


def transform(
    model: nn.Module,
    policy: str | Policy = "dense",
    compile: bool = False,
    spec: DiffusionSpec | None = None,
    cuda_graphs: bool = False,
    **policy_config,
) -> TransformedModel:
    """Trace ``model`` and rewrite it into a cache-backed, token-sparse step.

    Args:
        model: a dyllm-fx model (``dyllm_fx.load``), or any module called as
            ``model(input_ids, attention_mask=..., position_ids=...)`` with bidirectional
            attention through SDPA (see ``dyllm_fx.models.hf.bidirectional`` for transformers
            Llama / Qwen2 models).
        policy: which rows each layer recomputes: ``"dense"`` (all: identical to the input
            model), ``"fixed"`` (``rows=[...]``), ``"prefix_cache"`` / ``"dual_cache"``
            (Fast-dLLM), or a :class:`Policy` object.
        compile: compile each piece with inductor (static shapes per row bucket).
        spec: mask token id and logit shift; taken from ``model.diffusion`` when present.
        cuda_graphs: on CUDA, capture each warm step of a layer-uniform policy (``dense``,
            ``fixed``, ``prefix_cache``, ``dual_cache``) as a CUDA graph per shape and replay
            it (see ``runtime/cuda_graph.py``); other policies run eagerly.
        **policy_config: parameters of the named policy.

    Returns:
        :class:`TransformedModel`, usable with ``dyllm_fx.generate`` like the original.
    """
    if isinstance(model, TransformedModel):
        raise UsageError(
            f"model is already transformed (policy {model.policy.name!r}); transform the original model instead: "
            "dyllm_fx.transform(model, policy=...) with the module dyllm_fx.load() returned"
        )
    if model.training:
        raise ValueError("model is in training mode; call model.eval() before dyllm_fx.transform()")
    check_model_tensors(model)
    policy = make_policy(policy, **policy_config)  # bad names / parameters fail before the trace
    spec = spec or getattr(model, "diffusion", None)
    captured = capture_module(model)
    device = next(model.parameters()).device
    check_bidirectional(captured.gm, tuple(t.to(device) for t in example_inputs()))
    program = build_program(captured)
    return TransformedModel(program, policy, spec, compile=compile, cuda_graphs=cuda_graphs)


__all__ = ["SparseStep", "TransformedModel", "build_program", "transform"]
