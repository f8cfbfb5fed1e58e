"""Evaluation examples from a JSONL file: one ``{"prompt": ..., "answer": ...}`` object a line.

An optional ``"task"`` field groups examples in the per-task scores (default: the file's
name without its extension). Blank lines are skipped. This is how a user with real weights
evaluates on data they hold locally, e.g. GSM8K test questions with their reference
solutions (score them with ``--extractor gsm8k``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .synthetic_tasks import HELD_OUT_PER_TASK, Example

REQUIRED_FIELDS = ("prompt", "answer")


class JsonlTaskError(ValueError):
    """A malformed task file; the message names the file, the line and what is wrong."""


def parse_example(line: str, path: str | Path, lineno: int, default_task: str) -> Example:
    """One JSONL line -> :class:`Example`; raises :class:`JsonlTaskError` naming file and line."""
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise JsonlTaskError(
            f"{where}: invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON object"
        ) from err
    if not isinstance(obj, dict):
        raise JsonlTaskError(
            f'{where}: expected a JSON object like {{"prompt": ..., "answer": ...}}, got {type(obj).__name__}'
        )
    missing = [f for f in REQUIRED_FIELDS if f not in obj]
    if missing:
        raise JsonlTaskError(
            f'{where}: missing field {", ".join(repr(f) for f in missing)}; every line needs "prompt" and '
            '"answer"'
        )
    prompt, answer, task = obj["prompt"], obj["answer"], obj.get("task", default_task)
    if not isinstance(prompt, str) or not prompt:
        raise JsonlTaskError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r}")
    # Numeric answers ("answer": 72) are common in hand-written files; compare them as text.
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise JsonlTaskError(
            f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}"
        )
    if not isinstance(task, str) or not task:
        raise JsonlTaskError(f"{where}: field 'task' must be a non-empty string when given, got {task!r}")
    return Example(task=task, prompt=prompt, answer=answer)


def load_jsonl(path: str | Path) -> list[Example]:
    """All examples of a JSONL task file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"task file {str(path)!r} does not exist; pass a JSONL file or 'suite' for the synthetic suite"
        )
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                examples.append(parse_example(line, path, lineno, path.stem))
    if not examples:
        raise JsonlTaskError(
            f'{path}: no examples; expected one {{"prompt": ..., "answer": ...}} object per line'
        )
    return examples


SUITE = "suite"
# held-out prompts per task of `--task suite` (the same as `dyllm bench` scores)
SUITE_PER_TASK = HELD_OUT_PER_TASK


def suite_examples(limit: int | None = None, per_task: int = SUITE_PER_TASK) -> list[Example]:
    """Held-out synthetic-suite examples, interleaved across tasks (so a ``limit`` of the task
    count is one of each task rather than that many of the first)."""
    from .synthetic_tasks import TASKS, held_out_set

    if limit is not None:
        per_task = max(1, -(-limit // len(TASKS)))
    by_task = [held_out_set(per_task, tasks=(t,)) for t in TASKS]
    interleaved = [ex for group in zip(*by_task) for ex in group]
    return interleaved[:limit] if limit is not None else interleaved


def load_task(spec: str | Path, limit: int | None = None) -> list[Example]:
    """``"suite"`` (the synthetic held-out set) or a JSONL file, cut to ``limit`` examples."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if str(spec) == SUITE:
        return suite_examples(limit)
    examples = load_jsonl(spec)
    return examples[:limit] if limit is not None else examples
