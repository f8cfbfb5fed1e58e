"""Checks of policy parameters, shared by every policy.

* :func:`check_params`: ``make_policy`` checks the keyword parameters against the policy's
  constructor before building it, so a wrong name (``tua=0.9``), a missing required parameter
  (``fixed`` without ``rows``) or a value of the wrong type (``tau=True``, ``tau="a"``,
  ``refresh_interval=2.5``) gets a message that names the parameter and what it takes.
* :func:`number`, :func:`count`, :func:`flag`, :func:`choice`: what each constructor calls on
  its own values (also when a policy is built directly): the type, and the range that the
  annotation cannot say (``tau`` in (0, 1]), or an error naming the fix.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import numbers
import types
import typing

import torch

from ...values import check_integer, check_number


def check_params(cls: type, name: str, config: dict) -> None:
    """Raise a ValueError (unknown / missing parameter) or TypeError (wrong type) for ``config``."""
    signature = inspect.signature(cls.__init__)
    params = {
        k: p
        for k, p in signature.parameters.items()
        if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    listing = (
        ", ".join(k if p.default is p.empty else f"{k}={p.default!r}" for k, p in params.items()) or "none"
    )
    for key in config:
        if key not in params and not takes_any:
            close = difflib.get_close_matches(key, list(params), n=1)
            raise ValueError(
                f"bad parameters for policy {name!r}: it has no parameter {key!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; its parameters (defaults): {listing}"
            )
    missing = [k for k, p in params.items() if p.default is p.empty and k not in config]
    if missing:
        raise ValueError(
            f"bad parameters for policy {name!r}: it needs {', '.join(missing)}; its parameters: {listing}"
        )
    hints = _hints(cls)
    for key, value in config.items():
        hint = hints.get(key)
        if hint is None and key in params and params[key].default not in (None, inspect.Parameter.empty):
            hint = type(params[key].default)
        if hint is not None and not matches(value, hint):
            raise TypeError(
                f"bad parameters for policy {name!r}: {key} must be {describe(hint)}, got "
                f"{type(value).__name__} {value!r}"
            )


def _hints(cls: type) -> dict:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not evaluate here: fall back to the defaults' types
        return {}


def matches(value, hint) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (bools are not numbers here)."""
    if hint is typing.Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, h) for h in typing.get_args(hint))
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple, range)) and callable(getattr(value, "tolist", None)):
            value = value.tolist()  # a numpy array (a tensor is matched by its own annotation)
        if not isinstance(value, (list, tuple, range)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return not args or all(matches(v, args[0]) for v in value)
    if hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(hint, type):
        if hint is torch.Tensor:
            return isinstance(value, torch.Tensor)
        return isinstance(value, hint)
    return True  # an annotation this check does not know: leave it to the policy


def describe(hint) -> str:
    """``hint`` in words: 'a number', 'a list of integers or a tensor', ..."""
    if hint is bool:
        return "true or false (a bool)"
    if hint is float:
        return "a number"
    if hint is int:
        return "an integer"
    if hint is str:
        return "a string"
    if hint is type(None) or hint is None:
        return "None"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(h) for h in typing.get_args(hint))
    if origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        inner = describe(args[0]).removeprefix("a ").removeprefix("an ") if args else "value"
        return f"a list of {inner}s" if not inner.endswith("s") else f"a list of {inner}"
    if hint is torch.Tensor:
        return "a tensor"
    return getattr(hint, "__name__", str(hint))


def number(name: str, value, low: float, high: float, low_open: bool = False, hint: str = "") -> float:
    """``value`` as a float in [low, high] ((low, high] with ``low_open``): ``values.check_number``,
    so a policy's ``tau=True`` or ``tau=nan`` reads as every other argument's mistake does."""
    return check_number(name, value, minimum=low, maximum=high, above=low_open, hint=hint)


def count(name: str, value, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an int >= ``minimum`` (None passes when ``allow_none``): ``values.check_integer``."""
    return check_integer(name, value, minimum=minimum, allow_none=allow_none)


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def choice(name: str, value, options: tuple) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}; got {value!r}")
    return value


__all__ = ["check_params", "choice", "count", "describe", "flag", "matches", "number"]
