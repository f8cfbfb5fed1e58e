"""dyllm-fx: training-free acceleration of masked diffusion LLMs (LLaDA, Dream).

Public API:
    load(path_or_name)            -> (model, tokenizer)
    generate(model, tokenizer, prompts, **params) -> GenerationOutput
    transform(model, policy="dense", **config) -> TransformedModel (cache-backed sparse step)
    explain(transformed) -> str
    torch.compile(model, backend="dyllm")   (dynamo backend, see dyllm_fx.backend)
    export.to_onnx(transformed, path) / export.load_onnx(path) / export.to_tensorrt(transformed)
"""

from .explain import explain
from .generation import generate
from .loading import DEFAULT_MODEL, default_model_path, load
from .models import CheckpointError, DiffusionSpec
from .runtime.loop import GenerationOutput, GenerationStats
from .transform import TransformedModel, transform
from . import export  # dyllm_fx.export.to_onnx / load_onnx / to_tensorrt

__all__ = [
    "CheckpointError", "DEFAULT_MODEL", "DiffusionSpec", "GenerationOutput", "GenerationStats",
    "TransformedModel", "default_model_path", "explain", "generate", "load", "transform",
]
__version__ = "0.1.0"
