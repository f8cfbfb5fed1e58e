"""dyllm-fx: training-free acceleration of masked diffusion LLMs (LLaDA, Dream).

Public API:
    load(path_or_name)            -> (model, tokenizer); "default" / "default-dream" are embedded
    generate(model, tokenizer, prompts, **params) -> GenerationOutput
    transform(model, policy="dense", **config) -> TransformedModel (cache-backed sparse step)
    explain(transformed) -> str
    torch.compile(model, backend="dyllm")   (dynamo backend, see dyllm_fx.backend)
    export.to_onnx(transformed, path) / export.load_onnx(path) / export.to_tensorrt(transformed)
    LLM(model, policy=...).generate(prompts, SamplingParams(...)) -> [RequestOutput]  (dyllm_fx.serving)

The names are imported on first use, so ``import dyllm_fx`` (and the ``dyllm`` command line's
``--help``) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the submodule that defines it
_API = {
    "CheckpointError": "models",
    "DEFAULT_DREAM_MODEL": "options",
    "DEFAULT_MODEL": "options",
    "EMBEDDED_MODELS": "loading",
    "DiffusionSpec": "models",
    "CompletionOutput": "serving",
    "GenerationOutput": "runtime.loop",
    "GenerationStats": "runtime.loop",
    "LLM": "serving",
    "RequestOutput": "serving",
    "SamplingParams": "serving",
    "TransformedModel": "transform",
    "default_model_path": "loading",
    "explain": "explain",
    "generate": "generation",
    "load": "loading",
    "transform": "transform",
}
_SUBPACKAGES = ("export", "serving")

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        setattr(sys.modules[__name__], name, value)
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_API, *_SUBPACKAGES})


class _Package(types.ModuleType):
    """Keeps ``dyllm_fx.transform`` the function: importing the submodule of the same name
    (``from dyllm_fx.transform import TransformedModel``) would otherwise rebind the package
    attribute to the module."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _API.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
