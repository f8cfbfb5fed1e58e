"""Exact-match evaluation of a model on task examples (the synthetic suite or the user's own)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .generation import generate
from .tasks import Example


@dataclass
class TaskScore:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class EvalResult:
    per_task: dict[str, TaskScore] = field(default_factory=dict)
    seconds: float = 0.0
    nfe: int = 0
    response_tokens: int = 0
    outputs: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        total = sum(s.total for s in self.per_task.values())
        return sum(s.correct for s in self.per_task.values()) / total if total else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.response_tokens / self.seconds if self.seconds else 0.0


def evaluate(
    model, tokenizer, examples: Sequence[Example], batch_size: int = 16, progress: bool | None = None, **gen_params
) -> EvalResult:
    """Generate for every example in batches and score exact match of the response text."""
    result = EvalResult(per_task=defaultdict(TaskScore))
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    start = time.perf_counter()
    for batch in tqdm(batches, desc="evaluating", unit="batch", disable=progress is False, leave=False):
        out = generate(model, tokenizer, [e.prompt for e in batch], progress=False, **gen_params)
        result.nfe += out.stats.nfe
        result.response_tokens += out.responses.numel()
        for ex, text in zip(batch, out.texts):
            score = result.per_task[ex.task]
            score.total += 1
            score.correct += int(text.strip() == ex.answer.strip())
            result.outputs.append(text)
    result.seconds = time.perf_counter() - start
    result.per_task = dict(result.per_task)
    return result
