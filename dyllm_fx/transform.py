"""``dyllm_fx.transform``: run the compiler passes on a model and return the sparse-step module."""

from __future__ import annotations

import inspect

import torch.distributed as dist
from torch import nn

from .adapters import adapter_for
from .adapters.llada_dream import LLaDADreamAdapter
from .adapters.transformed import TransformedModel
from .distributed import check_size, group_for
from .errors import UsageError
from .models.checks import check_model_tensors, embedding_rows
from .models.spec import DiffusionSpec
from .passes.tensor_parallel import shard_model
from .runtime.engine import compile_backend
from .runtime.policies import Policy


def transform(
    model: nn.Module,
    policy: str | Policy = "dense",
    compile: bool | str = False,
    spec: DiffusionSpec | None = None,
    cuda_graphs: bool = False,
    tensor_parallel_size: int = 1,
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
            (Fast-dLLM), ``"dllm_cache"``, ``"es_dllm"``, ``"dyllm"``, a composition such as
            ``"dual_cache+dyllm"``, or a :class:`Policy` object. The methods default to their
            authors' settings, with per-model presets (``runtime/policies/presets.py``).
        compile: compile each step whole with inductor (``fullgraph=True``; one graph per plan
            key: a handful of capacity buckets and spans); a string names another
            torch.compile backend (e.g. "aot_eager").
        spec: mask token id and logit shift; taken from ``model.diffusion`` when present.
        cuda_graphs: on CUDA, capture each warm step as a CUDA graph per plan key and shape,
            and replay it (every policy; ``runtime/cuda_graph.py``).
        tensor_parallel_size: shard the model's heads and MLP over this many ranks (vLLM's
            name); every rank calls ``transform`` and ``generate`` alike and gets the same tokens.
            Needs torch.distributed initialised with that many ranks (``torchrun`` or
            :func:`dyllm_fx.distributed.spawn`); see ``dyllm_fx/passes/tensor_parallel.py``.
        **policy_config: parameters of the named policy.

    The model's adapter (``dyllm_fx.adapters``: LLaDA / Dream, DiffusionGemma) captures its step
    and runs the pass pipeline (``dyllm_fx.passes.pipeline``) on it.

    Returns:
        :class:`TransformedModel`, usable with ``dyllm_fx.generate`` like the original.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch module, got {type(model).__name__}; pass the model dyllm_fx.load() "
            "returned (model, tokenizer = dyllm_fx.load('default'))"
        )
    compile_backend(compile)  # an unknown backend fails here, not at the first generate
    if isinstance(model, TransformedModel):
        raise UsageError(
            f"model is already transformed (policy {model.policy.name!r}); transform the original model "
            "instead: "
            "dyllm_fx.transform(model, policy=...) with the module dyllm_fx.load() returned"
        )
    adapter = adapter_for(model)
    if isinstance(adapter, LLaDADreamAdapter):
        _check_language_model(model)
    if model.training:
        raise ValueError("model is in training mode; call model.eval() before dyllm_fx.transform()")
    check_model_tensors(model)
    if check_size(tensor_parallel_size) != 1:
        group = group_for(tensor_parallel_size)
        model = shard_model(model, dist.get_rank(), tensor_parallel_size, group)
    return adapter.transform(
        model, policy, spec=spec, compile=compile, cuda_graphs=cuda_graphs, **policy_config
    )


def _check_language_model(model: nn.Module) -> None:
    """A TypeError naming the fix when ``model`` cannot be a token-in, logits-out language
    model: the trace would otherwise fail with torch's own message about its forward."""
    name = type(model).__name__
    if embedding_rows(model) is None:
        raise TypeError(
            f"{name} is not a language model: it has no token embedding (nn.Embedding). transform() takes "
            "a LLaDA / Dream model from dyllm_fx.load(), or a transformers Llama / Qwen2 model wrapped with "
            "dyllm_fx.models.hf.bidirectional()"
        )
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a builtin forward: let the trace decide
        return
    takes_keywords = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "attention_mask" not in params and not takes_keywords:
        raise TypeError(
            f"{name}.forward{inspect.signature(model.forward)} does not take attention_mask=; transform() "
            "calls the model as model(input_ids, attention_mask=..., position_ids=...) and reads logits. "
            "Pass a model from dyllm_fx.load() or one wrapped with dyllm_fx.models.hf.bidirectional()"
        )


__all__ = ["TransformedModel", "transform"]
