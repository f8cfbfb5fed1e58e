"""A request and its rows (one :class:`Sequence` per completion) on the host side.

Each row keeps its own prompt ids and response tokens, so the scheduler can lay the rows of a
batch out anew at any block boundary (see ``batch.py``). A row's text is recomputed from its
committed blocks as each block ends: cut at the first EOS, at ``max_tokens`` and before the
first stop string.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time

import torch

from ..models.spec import DiffusionSpec
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .params import Resolved, SamplingParams

_ids = itertools.count()


class RowRandom:
    """A seeded row's own random stream: the CPU generator's state (and the CUDA device's,
    for logits on a GPU) swapped in around the row's sampling, so the row draws exactly what
    ``generate(..., seed=seed)`` of its prompt alone draws, whatever else shares its batch."""

    def __init__(self, seed: int, device: torch.device):
        gen = torch.Generator()
        gen.manual_seed(seed)
        self._cpu = gen.get_state()
        self._device = device if device.type == "cuda" else None
        self._cuda = None
        if self._device is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
            self._cuda = gen.get_state()

    @contextlib.contextmanager
    def active(self):
        saved = torch.get_rng_state()
        torch.set_rng_state(self._cpu)
        saved_cuda = None
        if self._device is not None:
            saved_cuda = torch.cuda.get_rng_state(self._device)
            torch.cuda.set_rng_state(self._cuda, self._device)
        try:
            yield
        finally:
            self._cpu = torch.get_rng_state()
            torch.set_rng_state(saved)
            if self._device is not None:
                self._cuda = torch.cuda.get_rng_state(self._device)
                torch.cuda.set_rng_state(saved_cuda, self._device)


class Sequence:
    """One row: a completion of a request, decoded block by block."""

    def __init__(
        self, request: "Request", index: int, sampler, rng: RowRandom | None, spec: DiffusionSpec, device
    ):
        self.request = request
        self.index = index
        self.sampler = sampler
        self.rng = rng
        self.resolved: Resolved = request.resolved
        self.response = torch.full(
            (self.resolved.window,), spec.mask_token_id, dtype=torch.long, device=device
        )
        self.blocks_done = 0
        self.output = CompletionOutput(index)
        self.cancelled = False
        self.nfe = 0
        self.active_sum = 0.0
        self.relayouts = 0
        self.scheduled_time: float | None = None

    @property
    def key(self) -> tuple:
        return self.resolved.key

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def finished(self) -> bool:
        return self.output.finish_reason is not None

    @property
    def pre_block(self) -> int:
        """Tokens before this row's current block in its own sequence (prompt + decoded blocks)."""
        return len(self.prompt_ids) + self.blocks_done * self.resolved.block_length

    @property
    def remaining(self) -> int:
        """Tokens from the current block to the end of the window."""
        return self.resolved.window - self.blocks_done * self.resolved.block_length

    def own_block_start(self) -> int:
        """Where the current block starts when the prompt is decoded alone (no padding)."""
        return self.pre_block

    def own_seq_len(self) -> int:
        return len(self.prompt_ids) + self.resolved.window

    def finish(self, reason: str, stop_reason=None) -> None:
        if self.output.finish_reason is None:
            self.output.finish_reason = reason
            self.output.stop_reason = stop_reason

    def block_done(self, response: list[int], tokenizer, spec: DiffusionSpec, now: float) -> None:
        """The current block committed: ``response`` is the row's whole window. Updates the text,
        and finishes the row on EOS, a stop string, or ``max_tokens``."""
        self.blocks_done += 1
        self.response_list = response
        decoded = response[: self.blocks_done * self.resolved.block_length]
        eos = set(spec.eos_token_ids)
        first_eos = next((i for i, t in enumerate(decoded) if t in eos), None)
        limit = self.resolved.max_tokens
        cut = min(len(decoded), limit, first_eos if first_eos is not None else len(decoded))
        skip = self.request.params.skip_special_tokens
        ids = decoded[:cut]
        text = tokenizer.decode(ids, skip_special_tokens=skip)
        stops = self.request.params.stop
        hit = min(((text.find(s), s) for s in stops if s in text), default=None)
        if hit is not None:
            text = text[: hit[0]]
            ids = _prefix_for_text(tokenizer, ids, text, skip)
            self.finish("stop", hit[1])
        elif first_eos is not None and first_eos < limit:
            self.finish("stop", decoded[first_eos])
        elif len(decoded) >= limit:
            self.finish("length")
        if not self.finished and stops:  # hold back what could be the start of a stop string
            hold = max(len(s) for s in stops) - 1
            text = text[: max(len(text) - hold, len(self.output.text))] if hold else text
            text = text if text.startswith(self.output.text) else self.output.text
        self.output.text = text
        self.output.token_ids = list(ids)
        if self.request.metrics.first_token_time is None:
            self.request.metrics.first_token_time = now


def _prefix_for_text(tokenizer, ids: list[int], text: str, skip: bool) -> list[int]:
    """The shortest prefix of ``ids`` whose text covers ``text`` (token ids cut at a stop string)."""
    for n in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:n], skip_special_tokens=skip)) >= len(text):
            return ids[:n]
    return ids


class Request:
    """A prompt, its parameters and its ``n`` rows."""

    def __init__(
        self,
        request_id: str | None,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        resolved: Resolved,
        arrival_time: float | None = None,
    ):
        self.request_id = request_id if request_id is not None else f"req-{next(_ids)}"
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.resolved = resolved
        self.metrics = RequestMetrics(arrival_time if arrival_time is not None else time.monotonic())
        self.seqs: list[Sequence] = []
        self.reported_finished = False

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        """A snapshot (fresh objects: the caller may keep it while the request runs on)."""
        m = self.metrics
        steps = sum(s.nfe for s in self.seqs)
        m.nfe = max((s.nfe for s in self.seqs), default=0)
        m.active_fraction = sum(s.active_sum for s in self.seqs) / steps if steps else 0.0
        m.relayouts = max((s.relayouts for s in self.seqs), default=0)
        return RequestOutput(
            self.request_id,
            self.prompt,
            list(self.prompt_ids),
            [dataclasses.replace(s.output, token_ids=list(s.output.token_ids)) for s in self.seqs],
            self.finished,
            dataclasses.replace(m),
        )


__all__ = ["Request", "RowRandom", "Sequence"]
