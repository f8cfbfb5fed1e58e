"""Serving: vLLM's ``LLM`` / ``SamplingParams`` API, a scheduler that batches requests as they
arrive (joining running batches at block boundaries), and an OpenAI-compatible HTTP server
(``dyllm serve``).

    LLM, SamplingParams, RequestOutput, CompletionOutput   the offline API (``llm.py``)
    ServingEngine                                          requests in, one step per call (``engine.py``)
    AsyncEngine                                            the engine in a thread, for the server
    build_app / serve                                      the FastAPI app and its uvicorn runner (``server.py``)

The server's modules import FastAPI lazily; ``pip install "dyllm-fx[serve]"`` brings it.
"""

from __future__ import annotations

from .engine import PromptTooLongError, ServingEngine
from .llm import LLM
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .params import SamplingParams
from .scheduler import QueueFull

__all__ = [
    "CompletionOutput", "LLM", "PromptTooLongError", "QueueFull", "RequestMetrics", "RequestOutput", "SamplingParams",
    "ServingEngine",
]
