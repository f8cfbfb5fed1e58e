"""``ServingEngine``: requests in, ``RequestOutput`` updates out, one denoising step per call.

    engine = ServingEngine(model, tokenizer, max_num_seqs=16)
    engine.add_request("shift:abc...=", SamplingParams(max_tokens=64))
    while engine.has_unfinished():
        for out in engine.step():        # outputs of the requests a block ended for
            ...

``step()`` runs one step of one batch (the batches take turns). :class:`~dyllm_fx.LLM` drives
it in the caller's thread; :class:`~dyllm_fx.serving.async_engine.AsyncEngine` in a thread of
its own for the HTTP server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence as Seq

import torch

from ..errors import UsageError
from ..generation import check_model_tensors, diffusion_spec, make_sampler, vocabulary_size
from ..values import check_token_ids
from .batch import Batch, Stepper
from .metrics import ServingMetrics
from .outputs import RequestOutput
from .params import SamplingParams, resolve
from .scheduler import QueueFull, RequestTooLarge, Scheduler
from .sequence import Request, RowRandom, Sequence

log = logging.getLogger("dyllm_fx.serving")


class PromptError(ValueError):
    """A prompt the model cannot take as it is (HTTP 400 naming the ``prompt`` field)."""


class PromptTooLongError(PromptError):
    """The prompt plus the response window exceed the model's window (HTTP 400)."""


class ServingEngine:
    """The model, its tokenizer, the scheduler and the batches' step engines.

    Args:
        model: a model ``dyllm_fx.load`` returned (decoded with a full forward per step) or a
            :class:`~dyllm_fx.TransformedModel` (each batch gets a step engine of its own over
            the model's traced program and a copy of its policy).
        max_num_seqs: rows (completions) decoding at once, over all batches.
        max_num_batches: batches side by side (one per block clock in use).
        max_queue_size: rows that may wait; None: unbounded (offline use).
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_num_seqs: int = 16,
        max_num_batches: int = 4,
        max_queue_size: int | None = None,
        metrics: ServingMetrics | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = diffusion_spec(model)
        self.device = check_model_tensors(model)
        self.vocab_size = vocabulary_size(model, self.spec)
        self.dream = bool(self.spec.logits_shift)
        self.scheduler = Scheduler(max_num_seqs, max_num_batches, max_queue_size)
        self.metrics = metrics or ServingMetrics()
        self._steppers: list[Stepper] = []  # idle step engines, reused by the next batch
        self._shared_busy = False
        self._requests: dict[str, Request] = {}
        self._aborted: list[Request] = []
        self._lock = threading.Lock()
        # tensor parallel: rank 0's engine journals what changes it between steps and sends it
        # to the other ranks' engines before each step (serving/mirror.py)
        self.mirror = None
        self._journal: list[tuple] = []
        probe = Stepper(model, self.spec)
        if probe.shared:
            self.scheduler.max_num_batches = 1  # one step function: one batch at a time
        self._steppers.append(probe)
        self.policy_name = probe.policy_name

    # --- requests ----------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int | None:
        return self.spec.max_length

    def tokenize(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def make_request(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """A checked request, not queued yet: ValueError / TypeError name what is wrong (an empty
        prompt, parameters the model family does not take, a prompt too long for the window)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty; pass a non-empty string")
            text, ids = prompt, self.tokenize(prompt)
        elif isinstance(prompt, Seq) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            text, ids = None, list(prompt)
            try:
                check_token_ids("the prompt", ids, self.vocab_size)
            except ValueError as err:
                raise PromptError(str(err)) from None
        else:
            raise TypeError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty (no tokens); pass a non-empty prompt")
        resolved = resolve(params, self.spec.trained_gen_length, self.spec.max_length)
        self._check_fits(len(ids), resolved.window, params.block_length or 1)
        sampler = make_sampler(self.dream, threshold=params.threshold, **params.sampler_kwargs(self.dream))
        request = Request(request_id, text, ids, params, resolved, arrival_time)
        request.prompt_tensor = torch.tensor(ids, dtype=torch.long, device=self.device)
        for i in range(params.n):
            rng = None if params.seed is None else RowRandom(params.seed + i, self.device)
            request.seqs.append(Sequence(request, i, sampler, rng, self.spec, self.device))
        return request

    def _check_fits(self, prompt_len: int, window: int, block: int) -> None:
        """A PromptTooLongError when the prompt and its response window overflow the model's
        window; it says whether a smaller max_tokens helps or only a shorter prompt does."""
        limit = self.spec.max_length
        if limit is None or prompt_len + window <= limit:
            return
        room = (limit - prompt_len) // block * block  # the largest whole-block window that fits
        if room < 1:
            raise PromptTooLongError(
                f"the prompt ({prompt_len} tokens) leaves no room for a response: with the smallest one "
                f"({block} token(s), one block) it exceeds the model's window of {limit} tokens; shorten the "
                f"prompt to at most {limit - block} tokens"
            )
        raise PromptTooLongError(
            f"the prompt ({prompt_len} tokens) + the response window ({window} tokens) = "
            f"{prompt_len + window} exceeds the model's window of {limit} tokens; shorten the "
            f"prompt or lower max_tokens (at most {room} here)"
        )

    def add_requests(self, requests: list[Request]) -> None:
        """Queue ``requests`` (all or none; :class:`QueueFull` when the queue has no room now,
        :class:`RequestTooLarge` when it never will)."""
        with self._lock:
            clash = [r.request_id for r in requests if r.request_id in self._requests]
            if clash:
                raise UsageError(f"request id {clash[0]!r} is already running; use a new id")
            try:
                self.scheduler.add([s for r in requests for s in r.seqs])
            except QueueFull:
                self.metrics.rejected("queue_full", len(requests))
                raise
            except RequestTooLarge:
                self.metrics.rejected("too_large", len(requests))
                raise
            for r in requests:
                self._requests[r.request_id] = r
            if self.mirror is not None:
                self._journal.append(("add", [(r.request_id, r.prompt_ids, r.params) for r in requests]))
        for r in requests:
            self.metrics.arrived(len(r.prompt_ids))

    def add_request(
        self, prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
        request = self.make_request(prompt, params, request_id)
        self.add_requests([request])
        return request

    def abort(self, request_id: str) -> bool:
        """Cancel a request (its rows leave their batch at the next block boundary); False when
        no such request runs. A tensor-parallel leader cancels at its next step boundary, where
        its followers replay the cancellation: never in the middle of a step they also run."""
        with self._lock:
            request = self._requests.get(request_id)
            if request is None or request.finished:
                return False
            if self.mirror is None:
                self._cancel(request)
            elif ("abort", request_id) not in self._journal:
                self._journal.append(("abort", request_id))
        return True

    def _cancel(self, request: Request) -> None:
        """(Under the lock.) Stop ``request``'s rows; its output is reported at the next step."""
        self.scheduler.abort(request.seqs)
        self._aborted.append(request)

    def has_unfinished(self) -> bool:
        return bool(self._requests) or self.scheduler.has_work()

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    # --- the loop ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One denoising step of the next batch. Returns an output for each request a block
        ended for (texts cumulative), finished or cancelled."""
        outputs: list[RequestOutput] = []
        # What this step runs is decided under the lock, together with the journal a
        # tensor-parallel leader sends: a request added meanwhile waits for the next step on
        # every rank alike.
        with self._lock, torch.inference_mode():
            if self.mirror is not None:
                self.mirror.lead(self._publish_journal())
            aborted, self._aborted = self._aborted, []
            self.scheduler.open_batches(self._new_batch)
            batch = self.scheduler.next_batch()
            if batch is not None and not batch.in_block:
                self._prepare(batch, outputs)
                if not batch.rows:
                    self._close(batch)
                    batch = None
        for request in aborted:
            self._maybe_finish(request, outputs)
        if batch is None:
            return outputs
        with torch.inference_mode():
            t0 = time.perf_counter()
            try:
                ended = batch.step()
            except Exception as err:  # a failed step ends its batch's requests, not the server
                log.exception("a step of batch %s failed", batch.key)
                self._fail(batch, err, outputs)
                return outputs
            self.metrics.stepped(time.perf_counter() - t0, len(batch.rows), batch.last_active)
        touched = {id(s.request): s.request for s in ended}
        for request in touched.values():
            if not self._maybe_finish(request, outputs):
                outputs.append(request.output())
        if ended:
            batch.drop_finished()
        return outputs

    def idle(self) -> None:
        """Called when there is nothing to step: a tensor-parallel leader's heartbeat."""
        if self.mirror is not None:
            with self._lock:
                self.mirror.heartbeat(self._publish_journal())

    def _publish_journal(self) -> list[tuple]:
        """(A leader, under the lock.) The events since the journal was last sent, emptied, its
        cancellations applied here as the followers apply them on receipt."""
        journal, self._journal = self._journal, []
        for kind, payload in journal:
            request = self._requests.get(payload) if kind == "abort" else None
            if request is not None and not request.finished:  # as a follower's abort() decides
                self._cancel(request)
        return journal

    def replay(self, journal: list[tuple]) -> None:
        """Apply a leader's journal (:meth:`step` of a tensor-parallel follower follows it)."""
        for kind, payload in journal:
            if kind == "add":
                self.add_requests([self.make_request(ids, params, rid) for rid, ids, params in payload])
            else:
                self.abort(payload)

    def fail_all(self, err: BaseException) -> list[RequestOutput]:
        """Finish every unfinished request with ``err`` (the engine cannot go on, e.g. a
        tensor-parallel rank is gone); returns their final outputs."""
        outputs: list[RequestOutput] = []
        with self._lock:
            requests = list(self._requests.values())
        for request in requests:
            for s in request.seqs:
                s.finish("error", f"{type(err).__name__}: {err}")
                s.cancelled = True
            self._maybe_finish(request, outputs)
        return outputs

    def _prepare(self, batch: Batch, outputs: list[RequestOutput]) -> None:
        """A batch at a block boundary: cancelled rows leave, waiting rows join, next block."""
        batch.drop_finished()
        joining = self.scheduler.admit(batch)
        now = time.monotonic()
        for s in joining:
            s.scheduled_time = now
            if s.request.metrics.first_scheduled_time is None:
                s.request.metrics.first_scheduled_time = now
        batch.add(joining)
        if batch.rows:
            batch.begin_block()

    def _new_batch(self, key: tuple) -> Batch:
        stepper = self._steppers.pop() if self._steppers else Stepper(self.model, self.spec)
        return Batch(key, stepper, self.spec, self.tokenizer, self.device)

    def _close(self, batch: Batch) -> None:
        self.scheduler.remove(batch)
        self._steppers.append(batch.stepper)

    def _fail(self, batch: Batch, err: Exception, outputs: list[RequestOutput]) -> None:
        for s in batch.rows:
            s.finish("error", f"{type(err).__name__}: {err}")
            s.cancelled = True
        requests = {id(s.request): s.request for s in batch.rows}
        batch.rows = []
        self.scheduler.remove(batch)  # its step engine may hold a half-written cache: dropped
        for request in requests.values():
            for s in request.seqs:  # the request's other rows (n > 1, other batches) stop too
                if not s.finished:
                    self.scheduler.abort([s])
            self._maybe_finish(request, outputs)

    def _maybe_finish(self, request: Request, outputs: list[RequestOutput]) -> bool:
        if not request.finished or request.reported_finished:
            return request.reported_finished
        request.reported_finished = True
        request.metrics.finished_time = time.monotonic()
        out = request.output()
        with self._lock:
            self._requests.pop(request.request_id, None)
        self.metrics.finished(out)
        outputs.append(out)
        return True

    def run(self, requests: list[Request]) -> list[RequestOutput]:
        """Queue ``requests``, step until every one finished, and return their final outputs in
        the order given (offline use: nothing else may drive this engine meanwhile)."""
        self.add_requests(requests)
        wanted = {r.request_id for r in requests}
        final: dict[str, RequestOutput] = {}
        while wanted - final.keys():
            if not self.has_unfinished():
                raise RuntimeError("the engine stopped with requests unfinished; this is a bug")
            for out in self.step():
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
        return [final[r.request_id] for r in requests]


__all__ = ["PromptError", "PromptTooLongError", "QueueFull", "RequestTooLarge", "ServingEngine"]
