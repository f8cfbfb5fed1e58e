"""Model families as adapters: how each one connects to the passes and the runtime.

``transform()``, ``generate()`` and the dynamo backend ask :func:`adapter_for` once and call the
adapter it returns (:class:`ModelAdapter` is the interface). A new family is one more adapter in
:data:`ADAPTERS`, ahead of the LLaDA / Dream one, which matches every model.
"""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter
from .diffusion_gemma import DiffusionGemmaAdapter
from .llada2 import LLaDA2Adapter
from .llada_dream import LLaDADreamAdapter

# Asked in order; the last one matches any model (LLaDA, Dream, a bidirectional transformers model).
ADAPTERS: tuple[ModelAdapter, ...] = (DiffusionGemmaAdapter(), LLaDA2Adapter(), LLaDADreamAdapter())


def adapter_for(model: nn.Module | None) -> ModelAdapter:
    """The adapter of ``model``'s family (None: a compiled free function, the default adapter)."""
    return next(a for a in ADAPTERS if a.matches(model))


__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for"]
