"""The OpenAI-compatible HTTP server behind ``dyllm serve`` (FastAPI + uvicorn).

Endpoints:

* ``GET /health``: 200 while the engine thread runs, 503 otherwise.
* ``GET /v1/models``: the served model.
* ``POST /v1/completions``: ``prompt`` a string, a list of strings, or token ids.
* ``POST /v1/chat/completions``: ``messages`` through the tokenizer's chat template (the trivial
  template for a tokenizer without one, see ``chat.py``).
* ``GET /metrics``: Prometheus text (requests, tokens/s, queue depth, active fraction, NFE).

Both generation endpoints take OpenAI's fields (``max_tokens``, ``temperature``, ``top_p``,
``n``, ``stop``, ``seed``, ``stream``, ``stream_options.include_usage``) plus the diffusion
ones as extra body fields: ``block_length``, ``steps``, ``threshold``, ``top_k``,
``remasking``, ``alg``. ``stream=true`` sends server-sent events, one chunk as each block
commits, then ``data: [DONE]``. Responses carry a ``metrics`` object (NFE, active fraction,
latency) beside ``usage``.

Errors have OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: malformed JSON,
a wrong field (a boolean or a string where a number belongs, a number that is not finite or
out of range), an unknown model, prompt token ids outside the vocabulary, a prompt too long for
the window, or a request with more completions than the queue ever holds give 400; a full
queue 429 (retry later); an unknown route 404. A client that disconnects (streaming
or not) has its requests cancelled, which frees their rows at the next block boundary.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations at
# run time, and the request models are built inside build_app (pydantic imported lazily).
import asyncio
import json
import logging
import socket
import sys
import threading
import time
import uuid
from typing import Any

from ..errors import DyllmError, EngineStoppedError
from .async_engine import AsyncEngine, Stream
from .chat import render_chat
from .engine import PromptError, ServingEngine
from .net import bind_socket, require_server_packages
from .outputs import RequestOutput
from .params import SamplingParams
from .scheduler import QueueFull, RequestTooLarge

log = logging.getLogger("dyllm_fx.serving")

DISCONNECT_POLL_S = 0.5  # how often a waiting handler checks whether its client is still there


def _imports():
    require_server_packages()


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _numbers_only(value):
    """A JSON number field's value as sent: ``true`` or ``"0.7"`` is refused, not read as 1.0
    or 0.7 (pydantic's lax mode would), since such a request is a mistake the client should see."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not the boolean {json.dumps(value)}")
    if isinstance(value, str):
        raise ValueError("must be a number, not a string: send it without quotes")
    return value


def _models():
    from typing import Annotated

    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

    Number = Annotated[float | None, BeforeValidator(_numbers_only)]
    Integer = Annotated[int | None, BeforeValidator(_numbers_only)]

    class _Common(BaseModel):
        model_config = ConfigDict(
            extra="allow"
        )  # unknown OpenAI fields are accepted and ignored, as vLLM does

        model: str | None = None
        max_tokens: Integer = None
        temperature: Number = None
        top_p: Number = None
        top_k: Integer = None
        n: Annotated[int, BeforeValidator(_numbers_only)] = 1
        stop: str | list[str] | None = None
        seed: Integer = None
        stream: bool = False
        stream_options: dict | None = None
        logprobs: Any = None
        # the diffusion knobs (OpenAI clients send them with extra_body=)
        block_length: Integer = Field(default=32)
        steps: Integer = None
        threshold: Number = None
        remasking: str | None = None
        alg: str | None = None

    class CompletionRequest(_Common):
        prompt: str | list[str] | list[int] | list[list[int]]
        echo: bool = False
        suffix: str | None = None

    class ChatMessage(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: str
        content: str | list[dict] | None = None

    class ChatCompletionRequest(_Common):
        messages: list[ChatMessage]
        max_completion_tokens: int | None = None
        top_logprobs: int | None = None

    return CompletionRequest, ChatCompletionRequest, ChatMessage


def sampling_params(req) -> SamplingParams:
    """The request's SamplingParams (ValueError / TypeError become 400)."""
    if req.logprobs not in (None, False, 0):
        raise OpenAIError(400, "logprobs are not supported by dyllm serve", param="logprobs")
    max_tokens = req.max_tokens
    if getattr(req, "max_completion_tokens", None) is not None:
        max_tokens = req.max_completion_tokens
    if max_tokens is not None and max_tokens < 1:
        raise OpenAIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            block_length=req.block_length,
            steps=req.steps,
            threshold=req.threshold,
            temperature=0.0 if req.temperature is None else req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            stop=req.stop,
            seed=req.seed,
            n=req.n,
            remasking=req.remasking,
            alg=req.alg,
        )
    except (TypeError, ValueError) as err:
        message = str(err)
        named = message.split(" ", 1)[0]  # the checks start with the field's name
        raise OpenAIError(400, message, param=named if named in type(req).model_fields else None) from None


def build_app(engine: AsyncEngine, model_name: str = "default", policy: str = ""):
    """The FastAPI application serving ``engine`` under the model name ``model_name``."""
    _imports()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    CompletionRequest, ChatCompletionRequest, _ = _models()
    core: ServingEngine = engine.engine
    created = int(time.time())
    app = FastAPI(title="dyllm-fx", description="OpenAI-compatible server for masked diffusion LLMs")
    app.state.engine = engine

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, err: OpenAIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err: RequestValidationError):
        errors = err.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", first.get("msg", ""))
            message = f"the request body is not valid JSON: {detail}"
            param = None
        else:
            loc = [str(p) for p in first.get("loc", ()) if p != "body"]
            param = ".".join(loc) or None
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}" + (
                f" (got {first['input']!r:.80})" if "input" in first and param else ""
            )
        return JSONResponse(OpenAIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            OpenAIError(err.status_code, str(err.detail), kind).body(), status_code=err.status_code
        )

    @app.exception_handler(Exception)
    async def _internal_error(request, err: Exception):  # pragma: no cover - a bug
        log.exception("internal error")
        body = OpenAIError(500, f"internal error: {type(err).__name__}: {err}", "internal_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        if not engine.alive:
            reason = f": {type(engine.error).__name__}: {engine.error}" if engine.error else ""
            return JSONResponse(
                {"status": "error", "detail": f"the engine thread is not running{reason}"}, status_code=503
            )
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "dyllm-fx",
            "max_model_len": core.max_model_len,
            "policy": core.policy_name,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        s = core.scheduler
        text = core.metrics.render(s.num_waiting, s.num_running, len(s.batches), model_name, core.policy_name)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def check_model(name: str | None) -> None:
        if name not in (None, model_name):
            raise OpenAIError(
                400,
                f"the model {name!r} does not exist; this server serves {model_name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def make_requests(prompts: list, params: SamplingParams, prefix: str) -> list:
        requests = []
        for i, prompt in enumerate(prompts):
            try:
                requests.append(core.make_request(prompt, params, request_id=f"{prefix}-{i}"))
            except (TypeError, ValueError, DyllmError) as err:
                if isinstance(err, PromptError):
                    param = "prompt"
                else:
                    param = "max_tokens" if "max_tokens" in str(err) else None
                raise OpenAIError(400, str(err), param=param) from None
        return requests

    def submit(requests: list) -> Stream:
        try:
            return engine.submit(requests)
        except QueueFull as err:
            raise OpenAIError(429, str(err), "rate_limit_error", code="queue_full") from None
        except RequestTooLarge as err:  # a retry cannot succeed: not a 429
            raise OpenAIError(400, str(err), param="n", code="request_too_large") from None
        except EngineStoppedError as err:
            raise OpenAIError(503, str(err), "server_error", code="engine_stopped") from None

    async def outputs_while_connected(stream: Stream, raw: Request):
        """The outputs of ``stream`` as they come, until it finishes or the client goes away
        (checked every ``DISCONNECT_POLL_S`` without an output). The caller aborts what is left."""
        while not stream.finished:
            try:
                out = await stream.next(DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await raw.is_disconnected():
                    return
                continue
            yield out

    async def final_outputs(stream: Stream, raw: Request) -> dict[str, RequestOutput]:
        """Wait for every request of ``stream``; cancel them when the client goes away."""
        final: dict[str, RequestOutput] = {}
        try:
            async for out in outputs_while_connected(stream, raw):
                if out.finished:
                    final[out.request_id] = out
        finally:
            if not stream.finished:  # the client went away, or the handler was cancelled: free the rows
                engine.abort(stream)
        return final

    def usage(outs: list[RequestOutput]) -> dict:
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        completion = sum(o.num_generated_tokens for o in outs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def metrics_of(outs: list[RequestOutput]) -> dict:
        if len(outs) == 1:
            return outs[0].metrics.as_dict()
        return {"requests": [o.metrics.as_dict() for o in outs]}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def event_stream(stream: Stream, requests: list, n: int, chunk, raw: Request, include_usage: bool):
        """SSE chunks: ``chunk(index, delta_text, finish_reason, first)`` for each choice whose
        text grew (as a block committed) or that finished."""
        order = {r.request_id: i for i, r in enumerate(requests)}
        sent: dict[int, int] = {}
        started: set[int] = set()
        ended: set[int] = set()
        finals: dict[str, RequestOutput] = {}
        try:
            async for out in outputs_while_connected(stream, raw):
                for c in out.outputs:
                    index = order[out.request_id] * n + c.index
                    delta = c.text[sent.get(index, 0) :]
                    first = index not in started
                    finish = c.finish_reason if index not in ended else None
                    if delta or first or finish is not None:
                        yield sse(chunk(index, delta, finish, first))
                        started.add(index)
                        sent[index] = len(c.text)
                        if finish is not None:
                            ended.add(index)
                if out.finished:
                    finals[out.request_id] = out
            if not stream.finished:  # the client went away: no usage, no [DONE]
                return
            if include_usage:
                yield sse(chunk(None, "", None, False, usage=usage(list(finals.values()))))
            yield "data: [DONE]\n\n"
        finally:
            if not stream.finished:  # the client went away (or the send failed): free the rows
                engine.abort(stream)

    async def respond(
        req, raw: Request, rid: str, requests: list, n: int, objects: tuple, stream_choice, final_choice
    ):
        """Run ``requests`` and answer as the OpenAI API does, under the response id ``rid``: with
        ``req.stream``, an SSE stream of chunks (object ``objects[0]``), each holding one
        ``stream_choice(index, text_delta, finish_reason, first)``; otherwise one body (object
        ``objects[1]``) with a ``final_choice(index, output)`` for every choice, the usage and
        the engine's metrics."""
        stream = submit(requests)
        created = int(time.time())

        def body(obj: str, choices: list) -> dict:
            return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices}

        if req.stream:

            def chunk(index, text, finish, first, usage=None):
                out = body(objects[0], [] if index is None else [stream_choice(index, text, finish, first)])
                if usage is not None:
                    out["usage"] = usage
                return out

            include = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                event_stream(stream, requests, n, chunk, raw, include), media_type="text/event-stream"
            )
        final = await final_outputs(stream, raw)
        outs = [final[r.request_id] for r in requests if r.request_id in final]
        choices = [final_choice(i * n + c.index, c) for i, o in enumerate(outs) for c in o.outputs]
        return {**body(objects[1], choices), "usage": usage(outs), "metrics": metrics_of(outs)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_model(req.model)
        if req.echo:
            raise OpenAIError(400, "echo is not supported by dyllm serve", param="echo")
        if req.suffix:
            raise OpenAIError(400, "suffix is not supported by dyllm serve", param="suffix")
        params = sampling_params(req)
        prompt = req.prompt
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise OpenAIError(400, "prompt is empty; pass a string or a non-empty list", param="prompt")
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        requests = make_requests(prompts, params, rid)

        def text_choice(index, text, finish, first):
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

        def final_choice(index, c):
            return text_choice(index, c.text, c.finish_reason, False)

        objects = ("text_completion", "text_completion")
        return await respond(req, raw, rid, requests, params.n, objects, text_choice, final_choice)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        check_model(req.model)
        if req.top_logprobs:
            raise OpenAIError(400, "logprobs are not supported by dyllm serve", param="top_logprobs")
        params = sampling_params(req)
        try:
            prompt = render_chat(core.tokenizer, [m.model_dump() for m in req.messages])
        except (TypeError, ValueError) as err:
            raise OpenAIError(400, str(err), param="messages") from None
        if not prompt:
            raise OpenAIError(400, "the messages hold no text", param="messages")
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        requests = make_requests([prompt], params, rid)

        def delta_choice(index, text, finish, first):
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

        def message_choice(index, c):
            message = {"role": "assistant", "content": c.text}
            return {"index": index, "message": message, "logprobs": None, "finish_reason": c.finish_reason}

        objects = ("chat.completion.chunk", "chat.completion")
        return await respond(req, raw, rid, requests, params.n, objects, delta_choice, message_choice)

    return app


def serve(
    engine: ServingEngine,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "default",
    threads: int | None = None,
    log_level: str = "warning",
    lifetime_s: float | None = None,
    announce=None,
    sock: socket.socket | None = None,
) -> None:
    """Run the server until interrupted (or for ``lifetime_s`` seconds). ``sock``: a socket
    already bound with :func:`bind_socket` (else ``host:port`` is bound here). ``announce(url)``
    is called once it listens (default: a line on stderr naming the URL)."""
    _imports()
    import uvicorn

    sock = sock if sock is not None else bind_socket(host, port)
    host, real_port = sock.getsockname()[:2]
    async_engine = AsyncEngine(engine, threads=threads).start()
    app = build_app(async_engine, model_name, engine.policy_name)
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, lifespan="off", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    timer = None
    if lifetime_s is not None:
        timer = threading.Timer(lifetime_s, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{real_port}"

    async def main():
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            (
                announce
                or (
                    lambda u: print(
                        f"dyllm serve: listening on {u} (model {model_name!r}, policy "
                        f"{engine.policy_name!r})",
                        file=sys.stderr,
                        flush=True,
                    )
                )
            )(url)
        while not task.done():  # an engine that stopped cannot answer: the server stops too
            if async_engine.error is not None:
                server.should_exit = True
            await asyncio.sleep(0.1)
        await task

    try:
        asyncio.run(main())
    finally:
        if timer is not None:
            timer.cancel()
        async_engine.shutdown()
        sock.close()
    if async_engine.error is not None:
        raise EngineStoppedError(
            f"the engine stopped: {type(async_engine.error).__name__}: {async_engine.error}"
        ) from async_engine.error


__all__ = ["AsyncEngine", "OpenAIError", "bind_socket", "build_app", "serve"]
