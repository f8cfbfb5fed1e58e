"""dyllm-fx: training-free acceleration of masked diffusion LLMs (LLaDA, Dream).

Public API:
    load(path_or_name)            -> (model, tokenizer)
    generate(model, tokenizer, prompts, **params) -> GenerationOutput
"""

from .generation import generate
from .loading import DEFAULT_MODEL, default_model_path, load
from .models import CheckpointError, DiffusionSpec
from .runtime.loop import GenerationOutput, GenerationStats

__all__ = [
    "CheckpointError", "DEFAULT_MODEL", "DiffusionSpec", "GenerationOutput", "GenerationStats",
    "default_model_path", "generate", "load",
]
__version__ = "0.1.0"
