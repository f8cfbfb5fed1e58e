"""Serving: vLLM's ``LLM`` / ``SamplingParams`` API, a scheduler that batches requests as they
arrive (joining running batches at block boundaries), and an OpenAI-compatible HTTP server
(``dyllm serve``).

    LLM, SamplingParams, RequestOutput, CompletionOutput   the offline API (``llm.py``)
    ServingEngine                                          requests in, one step per call (``engine.py``)
    AsyncEngine                                            the engine in a thread, for the server
    build_app / serve                                      the FastAPI app and its uvicorn runner
    (``server.py``)
    ServerProcess                                          ``dyllm serve`` in a child process (``process.py``)

The names are imported on first use (``net.py`` and ``process.py``, which the command line and the clients
need
before any weights load, import neither torch nor FastAPI). ``pip install "dyllm-fx[serve]"`` brings
FastAPI, uvicorn and the openai client.
"""

from __future__ import annotations

import importlib

_API = {
    "AsyncEngine": "async_engine",
    "CompletionOutput": "outputs",
    "LLM": "llm",
    "PromptError": "engine",
    "PromptTooLongError": "engine",
    "QueueFull": "scheduler",
    "RequestMetrics": "outputs",
    "RequestOutput": "outputs",
    "RequestTooLarge": "scheduler",
    "SamplingParams": "params",
    "ServerProcess": "process",
    "ServingEngine": "engine",
    "build_app": "server",
    "serve": "server",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_API})
