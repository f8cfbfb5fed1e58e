"""Serving counters, rendered in the Prometheus text exposition format (``GET /metrics``).

Written by the engine's thread, read by the server's; one lock guards them. No dependency on
``prometheus_client``: the format is a few lines of text.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from .outputs import RequestOutput

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
NFE_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
THROUGHPUT_WINDOW_S = 60.0  # tokens/s is measured over the last minute


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_num(edge)}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {_num(self.sum)}",
            f"{name}_count {self.count}",
        ]
        return out


class ServingMetrics:
    """Requests (received, finished by reason, rejected), tokens, steps, NFE and latency."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.received = 0
        self.finished_by_reason: dict[str, int] = {}
        self.rejected_by_reason: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.step_seconds = 0.0
        self.row_steps = 0
        self.active_sum = 0.0  # summed per step
        self.nfe = _Histogram(NFE_BUCKETS)
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.active = _Histogram(tuple(i / 10 for i in range(1, 11)))  # per request
        self._recent: deque[tuple[float, int]] = deque()  # (finish time, tokens)

    def arrived(self, prompt_tokens: int) -> None:
        with self._lock:
            self.received += 1
            self.prompt_tokens += prompt_tokens

    def rejected(self, reason: str, count: int = 1) -> None:
        with self._lock:
            self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + count

    def stepped(self, seconds: float, rows: int, active_fraction: float) -> None:
        with self._lock:
            self.steps += 1
            self.step_seconds += seconds
            self.row_steps += rows
            self.active_sum += active_fraction

    def finished(self, out: RequestOutput) -> None:
        now = time.monotonic()
        reasons = [o.finish_reason or "unknown" for o in out.outputs]
        reason = "abort" if "abort" in reasons else ("error" if "error" in reasons else reasons[0])
        tokens = out.num_generated_tokens
        with self._lock:
            self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
            self.generation_tokens += tokens
            if out.metrics.nfe:
                self.nfe.observe(out.metrics.nfe)
                self.active.observe(out.metrics.active_fraction)
            if out.metrics.latency is not None:
                self.latency.observe(out.metrics.latency)
            self._recent.append((now, tokens))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last minute (or since the start, if sooner)."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            span = min(THROUGHPUT_WINDOW_S, now - self.started)
            return sum(t for _, t in self._recent) / span if span > 0 else 0.0

    def render(self, waiting: int, running: int, batches: int, model: str = "", policy: str = "") -> str:
        """The Prometheus text format; ``waiting`` / ``running`` / ``batches`` are the gauges now."""
        tps = self.tokens_per_second()
        with self._lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
                lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

            metric(
                "dyllm_info",
                "gauge",
                "The served model and policy.",
                [f'dyllm_info{{model="{_label(model)}",policy="{_label(policy)}"}} 1'],
            )
            metric(
                "process_start_time_seconds",
                "gauge",
                "When this server process started, in seconds since the epoch (tells replicas apart).",
                [f"process_start_time_seconds {self.started_wall:.6f}"],
            )
            metric(
                "dyllm_requests_received_total",
                "counter",
                "Requests accepted into the queue.",
                [f"dyllm_requests_received_total {self.received}"],
            )
            metric(
                "dyllm_requests_total",
                "counter",
                "Requests finished, by finish reason.",
                [
                    f'dyllm_requests_total{{finish_reason="{r}"}} {n}'
                    for r, n in sorted(self.finished_by_reason.items())
                ]
                or ['dyllm_requests_total{finish_reason="stop"} 0'],
            )
            metric(
                "dyllm_requests_rejected_total",
                "counter",
                "Requests refused, by reason (queue_full: HTTP 429).",
                [
                    f'dyllm_requests_rejected_total{{reason="{r}"}} {n}'
                    for r, n in sorted(self.rejected_by_reason.items())
                ]
                or ['dyllm_requests_rejected_total{reason="queue_full"} 0'],
            )
            metric(
                "dyllm_prompt_tokens_total",
                "counter",
                "Prompt tokens of accepted requests.",
                [f"dyllm_prompt_tokens_total {self.prompt_tokens}"],
            )
            metric(
                "dyllm_generation_tokens_total",
                "counter",
                "Response tokens returned (up to EOS / stop / max_tokens).",
                [f"dyllm_generation_tokens_total {self.generation_tokens}"],
            )
            metric(
                "dyllm_tokens_per_second",
                "gauge",
                f"Response tokens per second over the last {THROUGHPUT_WINDOW_S:.0f} s.",
                [f"dyllm_tokens_per_second {_num(tps)}"],
            )
            metric(
                "dyllm_num_requests_waiting",
                "gauge",
                "Rows (completions) in the queue.",
                [f"dyllm_num_requests_waiting {waiting}"],
            )
            metric(
                "dyllm_num_requests_running",
                "gauge",
                "Rows (completions) decoding now.",
                [f"dyllm_num_requests_running {running}"],
            )
            metric(
                "dyllm_num_batches",
                "gauge",
                "Batches running side by side.",
                [f"dyllm_num_batches {batches}"],
            )
            metric(
                "dyllm_steps_total",
                "counter",
                "Denoising steps run (one batch each).",
                [f"dyllm_steps_total {self.steps}"],
            )
            metric(
                "dyllm_step_seconds_total",
                "counter",
                "Seconds spent in denoising steps.",
                [f"dyllm_step_seconds_total {_num(self.step_seconds)}"],
            )
            metric(
                "dyllm_row_steps_total",
                "counter",
                "Rows computed, summed over steps (batch size per step).",
                [f"dyllm_row_steps_total {self.row_steps}"],
            )
            mean_active = self.active_sum / self.steps if self.steps else 0.0
            metric(
                "dyllm_active_fraction",
                "gauge",
                "Mean fraction of (layer, position) rows a step recomputed, over every step so far.",
                [f"dyllm_active_fraction {_num(mean_active)}"],
            )
            metric(
                "dyllm_request_active_fraction",
                "histogram",
                "Per request: mean active fraction of its steps.",
                self.active.lines("dyllm_request_active_fraction"),
            )
            metric(
                "dyllm_request_nfe",
                "histogram",
                "Per request: forward evaluations (denoising steps) it took part in.",
                self.nfe.lines("dyllm_request_nfe"),
            )
            metric(
                "dyllm_request_latency_seconds",
                "histogram",
                "Per request: seconds from arrival to its last token.",
                self.latency.lines("dyllm_request_latency_seconds"),
            )
        return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


__all__ = ["ServingMetrics"]
