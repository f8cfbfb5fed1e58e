"""What a request returns: vLLM's ``RequestOutput`` / ``CompletionOutput`` shape, plus the
diffusion metrics (NFE, active fraction) and timings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One completion of a request.

    ``token_ids`` are the response tokens up to (not including) the first EOS, cut at
    ``max_tokens`` and before a stop string. ``finish_reason``: "stop" (EOS or a stop string),
    "length" (``max_tokens`` reached), "abort" (cancelled), "error" (the step failed), or None
    while the request runs. ``stop_reason``: the stop string or EOS token id that ended it.
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timings (``time.monotonic()`` seconds) and decoding counters of one request.

    ``nfe``: forward evaluations the request's rows took part in (each step of its batch counts
    one per row; the most of its completions). ``active_fraction``: the mean, over those
    steps, of the fraction of (layer, position) rows the step recomputed (1.0 for the
    untransformed model). ``relayouts``: cold steps caused by rows joining or leaving its batch.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    nfe: int = 0
    active_fraction: float = 0.0
    relayouts: int = 0

    @property
    def latency(self) -> float | None:
        """Seconds from arrival to the last token (None while running)."""
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to the end of the first block (its text is the first streamed)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def as_dict(self) -> dict:
        return {
            "nfe": self.nfe,
            "active_fraction": round(self.active_fraction, 4),
            "relayouts": self.relayouts,
            "latency_s": _round(self.latency),
            "queue_s": _round(self.queue_time),
            "time_to_first_token_s": _round(self.time_to_first_token),
        }


@dataclass
class RequestOutput:
    """The state of one request: its prompt, one :class:`CompletionOutput` per ``n``, whether it
    finished, and its :class:`RequestMetrics`. The engine hands out a fresh object at every
    update (texts are cumulative, not deltas)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


__all__ = ["CompletionOutput", "RequestMetrics", "RequestOutput"]
