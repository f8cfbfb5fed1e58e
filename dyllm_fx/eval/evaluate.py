"""Exact-match evaluation of a model on task examples (the synthetic suite or the user's own).

:func:`evaluate` scores one model; :func:`evaluate_policy` scores a policy and, against a
vanilla run on the same prompts, the token agreement of its decodes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..generation import generate
from ..policy_setup import VANILLA, apply_policy, records_of
from .agreement import AgreementCounter
from .extractors import Extractor, exact_match, get_extractor
from .significance import Paired, wilson_interval
from .synthetic_tasks import Example


@dataclass
class TaskScore:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the accuracy."""
        return wilson_interval(self.correct, self.total)


@dataclass
class EvalResult:
    """Scores and speed of one evaluation run.

    ``nfe`` is summed over batches (every sequence of a batch shares its batch's steps);
    ``nfe_per_generation`` is the mean per batch. ``step_active_fractions`` holds the sparse
    engine's active fraction of every step (empty for an untransformed model, which
    computes every row: :attr:`active_fraction` is then 1.0).
    """

    per_task: dict[str, TaskScore] = field(default_factory=dict)
    seconds: float = 0.0
    nfe: int = 0
    generations: int = 0
    response_tokens: int = 0
    outputs: list[str] = field(default_factory=list)
    extracted: list[str | None] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    responses: list[torch.Tensor] = field(default_factory=list)  # (B, G) token ids per batch
    step_active_fractions: list[float] = field(default_factory=list)
    agreement: float | None = None  # token agreement with the reference run, when one was made
    paired: Paired | None = None  # prompts won / lost against the reference run and the exact McNemar p

    @property
    def accuracy(self) -> float:
        total = sum(s.total for s in self.per_task.values())
        return sum(s.correct for s in self.per_task.values()) / total if total else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.response_tokens / self.seconds if self.seconds else 0.0

    @property
    def nfe_per_generation(self) -> float:
        return self.nfe / self.generations if self.generations else 0.0

    @property
    def active_fraction(self) -> float:
        steps = self.step_active_fractions
        return sum(steps) / len(steps) if steps else 1.0

    @property
    def n_correct(self) -> int:
        return sum(s.correct for s in self.per_task.values())

    @property
    def n(self) -> int:
        return sum(s.total for s in self.per_task.values())

    def summary(self) -> dict:
        """The headline figures as plain numbers (JSON-ready); intervals are 95% Wilson."""
        paired = self.paired
        return {
            "accuracy": self.accuracy,
            "accuracy_interval": list(wilson_interval(self.n_correct, self.n)),
            "correct": self.n_correct,
            "per_task": {
                t: {"accuracy": s.accuracy, "correct": s.correct, "n": s.total, "interval": list(s.interval)}
                for t, s in self.per_task.items()
            },
            "n": self.n,
            "paired": None
            if paired is None
            else {"won": paired.won, "lost": paired.lost, "mcnemar_p": paired.p_value},
            "tokens_per_s": self.tokens_per_second,
            "seconds": self.seconds,
            "nfe": self.nfe_per_generation,
            "nfe_total": self.nfe,
            "active_fraction": self.active_fraction,
            "agreement": self.agreement,
        }


def evaluate(
    model,
    tokenizer,
    examples: Sequence[Example],
    batch_size: int = 16,
    progress: bool | None = None,
    extractor: str | Extractor = "strip",
    desc: str = "evaluating",
    **gen_params,
) -> EvalResult:
    """Generate for every example in batches and score exact match of the extracted answer.

    Args:
        extractor: how to read the answer out of a response (see :mod:`dyllm_fx.eval.extractors`).
        gen_params: decoding arguments of :func:`dyllm_fx.generate`.
    """
    extract = get_extractor(extractor)
    result = EvalResult(per_task=defaultdict(TaskScore))
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    bar = tqdm(total=len(examples), desc=desc, unit="prompt", disable=progress is False, leave=False)
    start = time.perf_counter()
    try:
        for batch in batches:
            out = generate(model, tokenizer, [e.prompt for e in batch], progress=False, **gen_params)
            result.nfe += out.stats.nfe
            result.generations += 1
            result.response_tokens += out.responses.numel()
            result.responses.append(out.responses.cpu())
            # The engine keeps the records of its last generation only: read them per batch.
            records = records_of(model)
            if records is not None:
                result.step_active_fractions.extend(r.active_fraction for r in records)
            for ex, text in zip(batch, out.texts):
                ok = exact_match(text, ex.answer, extract)
                score = result.per_task[ex.task]
                score.total += 1
                score.correct += int(ok)
                result.outputs.append(text)
                result.extracted.append(extract(text))
                result.correct.append(ok)
            bar.update(len(batch))
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start
    result.per_task = dict(result.per_task)
    return result


def agreement_between(result: EvalResult, reference: EvalResult) -> float:
    """Token agreement of two runs over the same examples and batching."""
    if len(result.responses) != len(reference.responses):
        raise ValueError(
            "the two runs have different numbers of batches; evaluate both with the same examples and "
            "batch_size"
        )
    counter = AgreementCounter()
    for ours, theirs in zip(result.responses, reference.responses):
        counter.update(ours, theirs)
    return counter.value


def evaluate_policy(
    model,
    tokenizer,
    examples: Sequence[Example],
    policy: str = VANILLA,
    policy_args: Mapping | None = None,
    reference: str | None = VANILLA,
    compile: bool = False,
    **eval_params,
) -> tuple[EvalResult, EvalResult | None]:
    """Evaluate ``policy`` on ``model`` (untransformed) and its token agreement with a reference.

    Args:
        policy: ``"vanilla"`` (the untransformed model) or a :func:`dyllm_fx.transform` policy.
        policy_args: that policy's parameters.
        reference: ``"vanilla"`` (untransformed model), ``"dense"`` (transformed, every row
            recomputed) or None (no agreement measured). Skipped when it equals ``policy``
            without arguments: the agreement is then 1.0 by definition.
        eval_params: :func:`evaluate` arguments (batch_size, extractor, decoding arguments).

    Returns:
        ``(result, reference_result)``; ``result.agreement`` is set when a reference ran.
    """
    # The reference runs first, so its one-time costs (allocator, thread pool warm-up) do not
    # land in the policy's tokens/s.
    ref = None
    if reference is not None and not (reference == policy and not policy_args):
        ref = evaluate(
            apply_policy(model, reference), tokenizer, examples, desc=f"reference {reference}", **eval_params
        )
    fast = apply_policy(model, policy, policy_args, compile=compile)
    result = evaluate(fast, tokenizer, examples, desc=f"eval {policy}", **eval_params)
    if ref is not None:
        result.agreement = agreement_between(result, ref)
        result.paired = Paired.of(result.correct, ref.correct)
    elif reference is not None:
        result.agreement = 1.0  # the policy is its own reference
        result.paired = Paired(0, 0, 1.0)
    return result, ref
