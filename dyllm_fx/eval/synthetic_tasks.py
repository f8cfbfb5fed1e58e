"""The synthetic reasoning suite the embedded model is trained and evaluated on.

Each task maps a random instance to a (prompt, answer) pair of short character strings. The
model decodes the answer into a 64-token window padded with EOS, so caching has a whole
response region to work on. A deterministic hash splits the instance space into train and
test, so evaluation prompts never appear in training.

Answer lengths (suite version 3): ``shift`` 32 characters; ``copy``, ``reverse``, ``sort``,
``lookup`` and ``running_sum`` 16; ``add`` 8 or 9 (two 8-digit numbers). Version 1 used 32
everywhere (16-17 for ``add``): exact match over 32 characters needs a per-character accuracy
above 99.7% for 90% of prompts, which a 2M-parameter model trained for a few CPU hours reached
on ``shift`` only. Version 3 adds ``copy``: the 8-layer embedded models trained on all six
version-2 tasks stayed near chance on ``lookup``, ``running_sum`` and ``add`` (see docs/models.md,
"The embedded models"), so the suite gains one more task a model of this size can learn. The
three hard ones stay in the suite and in every report.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

DIGITS = string.digits
LETTERS = string.ascii_lowercase
SEPARATORS = ":=+,?"
ALPHABET = DIGITS + LETTERS + SEPARATORS  # every character a prompt or answer can contain
SUITE_VERSION = 3
SHIFT_LENGTH = 32  # letters of a shift instance (the README's set-up command is one)
LENGTH = 16  # characters of a copy, reverse, sort, lookup or running_sum instance
ADD_DIGITS = 8  # digits of each addend
LOOKUP_KEYS = 10  # entries of a lookup table
# Held-out prompts per task that `dyllm bench` and `dyllm eval` score by default: 70 x 7 tasks
# = 490 prompts, so that one prompt is 0.2 points and a 95% interval is about +-4.5 points.
HELD_OUT_PER_TASK = 70


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def _shift(rng: random.Random) -> tuple[str, str]:
    """Caesar shift by one (a->b, ..., z->a): each answer character depends on one prompt character."""
    s = "".join(rng.choices(LETTERS, k=SHIFT_LENGTH))
    return f"shift:{s}=", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)


def _copy(rng: random.Random) -> tuple[str, str]:
    """The answer repeats the prompt: each answer character is one prompt character, unchanged."""
    s = "".join(rng.choices(LETTERS, k=LENGTH))
    return f"copy:{s}=", s


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choices(LETTERS, k=LENGTH))
    return f"rev:{s}=", s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choices(DIGITS, k=LENGTH))
    return f"sort:{s}=", "".join(sorted(s))


def _lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(LETTERS, LOOKUP_KEYS)
    table = {k: rng.choice(DIGITS) for k in keys}
    query = "".join(rng.choices(keys, k=LENGTH))
    pairs = ",".join(f"{k}{v}" for k, v in table.items())
    return f"kv:{pairs}?{query}=", "".join(table[k] for k in query)


def _running_sum(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randrange(10) for _ in range(LENGTH)]
    out, acc = [], 0
    for d in digits:
        acc = (acc + d) % 10
        out.append(str(acc))
    return "cum:" + "".join(map(str, digits)) + "=", "".join(out)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = (rng.randrange(10 ** (ADD_DIGITS - 1), 10**ADD_DIGITS) for _ in range(2))
    return f"add:{a}+{b}=", str(a + b)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "shift": _shift,
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "lookup": _lookup,
    "running_sum": _running_sum,
    "add": _add,
}
# Difficulty tiers for reporting: easy tasks read each answer character at a fixed offset
# (plus one content match for lookup); medium ones chain through the previous answer
# character; hard ones need position arithmetic (reverse), counting (sort) or carries (add).
DIFFICULTY = {
    "shift": "easy",
    "copy": "easy",
    "lookup": "easy",
    "running_sum": "medium",
    "reverse": "hard",
    "sort": "hard",
    "add": "hard",
}
EASY_TASKS = tuple(t for t, d in DIFFICULTY.items() if d == "easy")


def is_test_prompt(prompt: str) -> bool:
    """One instance in ten, chosen by a stable hash of the prompt, is held out for evaluation."""
    return hashlib.sha256(prompt.encode()).digest()[0] % 10 == 0


def sample(task: str, rng: random.Random, split: str = "train") -> Example:
    """Draw one instance of ``task`` from ``split`` ("train" or "test")."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; the suite has {sorted(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    while True:
        prompt, answer = TASKS[task](rng)
        if is_test_prompt(prompt) == (split == "test"):
            return Example(task, prompt, answer)


def held_out_set(n_per_task: int, tasks: tuple[str, ...] | None = None, seed: int = 1234) -> list[Example]:
    """A fixed, reproducible list of held-out examples, ``n_per_task`` for each task."""
    out = []
    for task in tasks or tuple(TASKS):
        rng = random.Random(f"{seed}-{task}")
        out.extend(sample(task, rng, "test") for _ in range(n_per_task))
    return out
