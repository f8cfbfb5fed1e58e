"""Checks on the numbers, token ids and output paths a user hands over: the API's arguments, the
server's request fields, config.json's settings and the command line all go through these, so
each mistake reads the same wherever it is made.

Booleans are not numbers (``temperature=True`` is a mistake, not 1.0), integers must be
integral (a float seed is refused, not truncated), and numbers must be finite. Each error is a
``TypeError`` (wrong kind of value) or a ``ValueError`` (out of range) naming the argument and
what to pass. No torch here: the command line may use it before torch is imported.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from pathlib import Path

from .errors import UsageError

# The seeds torch's generators accept (``torch.manual_seed``).
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


def _kind(value) -> str:
    return f"{type(value).__name__} {value!r}"[:120]


def check_integer(
    name: str,
    value,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
    hint: str = "",
) -> int | None:
    """``value`` as a Python int (numpy / torch integers too) in [minimum, maximum].

    A float is refused even when it is whole: the caller learns the exact number to pass
    instead of having a fraction cut off silently. ``hint`` is appended to the message."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be an integer, got None{hint}")
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool {value!r} (booleans are not numbers){hint}")
    try:
        number = operator.index(value)
    except TypeError:
        if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
            fix = f"; pass {name}={int(value)}"
        else:
            fix = "" if hint else "; pass a whole number"
        raise TypeError(f"{name} must be an integer, got {_kind(value)}{fix}{hint}") from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {_bounds(minimum, maximum)}, got {number}{hint}")
    return number


def check_number(
    name: str,
    value,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: bool = False,
    allow_none: bool = False,
    hint: str = "",
) -> float | None:
    """``value`` as a finite float in [minimum, maximum] ((minimum, maximum] with ``above``)."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a number, got None{hint}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_kind(value)}{hint}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}{hint}")
    low = minimum is not None and (number <= minimum if above else number < minimum)
    high = maximum is not None and number > maximum
    if low or high:
        raise ValueError(f"{name} must be {_bounds(minimum, maximum, above)}, got {value}{hint}")
    return number


def check_seed(name: str, value, count: int = 1) -> int | None:
    """A random seed (None: unseeded): an integer torch accepts, with room for ``count``
    consecutive seeds (completion i of a request draws with seed + i)."""
    return check_integer(
        name,
        value,
        minimum=SEED_MIN,
        maximum=SEED_MAX - (count - 1),
        allow_none=True,
        hint="; a seed is a whole number such as 0 or 1234",
    )


def check_token_ids(name: str, ids, vocab_size: int | None, hint: str = "") -> None:
    """Every id of ``ids`` is an int in [0, vocab_size) (no bound check when vocab_size is None).

    The message names the first id outside the vocabulary and its position, since the model's
    embedding lookup otherwise fails deep inside a step or, on some devices, reads garbage."""
    for position, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise TypeError(f"{name} token ids must be integers; position {position} holds {_kind(token)}")
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            bound = f"0 to {vocab_size - 1}" if vocab_size is not None else "0 or more"
            raise ValueError(
                f"{name} token id {int(token)} at position {position} is outside the model's vocabulary "
                f"(ids {bound}){hint or _RETOKENIZE}"
            )


_RETOKENIZE = "; encode the text with the model's own tokenizer"


def _bounds(minimum, maximum, above: bool = False) -> str:
    if minimum is not None and maximum is not None:
        return f"in {'(' if above else '['}{_show(minimum)}, {_show(maximum)}]"
    if minimum is not None:
        return f"{'>' if above else '>='} {_show(minimum)}"
    return f"<= {_show(maximum)}"


def _show(bound) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def check_output_path(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a file this process can write: its folder created if missing; a UsageError if
    it is a folder, its folder cannot be created, or either is read-only. The file itself is
    written later, by the command."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name inside it, e.g. {path / 'out'}")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{option} {path}: {ancestor} is a file, not a folder; pick another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"{option} {path}: cannot create its folder ({err.strerror}); pick another path"
        ) from None
    writable = os.access(path, os.W_OK) if path.exists() else os.access(path.parent, os.W_OK | os.X_OK)
    if not writable:
        raise UsageError(f"{option} {path} is not writable; pick a path in a folder you can write to")
    return path


__all__ = [
    "SEED_MAX",
    "SEED_MIN",
    "check_integer",
    "check_output_path",
    "check_number",
    "check_seed",
    "check_token_ids",
]
