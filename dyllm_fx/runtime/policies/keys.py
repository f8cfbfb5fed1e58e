"""Plan keys: the small typed value that fixes every shape of a step.

A policy's ``plan()`` returns a :class:`~dyllm_fx.runtime.policies.base.Plan` whose ``key`` is
one of these frozen dataclasses: hashable (one compiled step, CUDA graph or exported graph per
key), a dynamo-static constant, with named fields (``key.width``, ``key.capacity``) instead of
positions. Each kind of key registers itself by its ``kind``, so a key written as JSON (the
export's metadata: ``[kind, *fields]``) reads back as the same typed value.

An exported graph may write a size equal to the sequence length as :data:`SEQ` (its width is
then the sequence axis itself): :meth:`PlanKey.map_sizes` swaps such sizes in and out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass, fields, replace
from typing import ClassVar

SEQ = "L"  # a size equal to the sequence length, in a graph key


class PlanKeyError(ValueError):
    """A policy's plan keys cannot be listed for a layout; the message says what to change."""


_KINDS: dict[str, type[PlanKey]] = {}


@dataclass(frozen=True)
class PlanKey:
    """Base class of the plan keys; a subclass sets ``kind`` and lists its size fields in
    ``SIZES`` (the fields that are row counts, as opposed to modes and flags)."""

    kind: ClassVar[str] = ""
    SIZES: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind:
            if kind in _KINDS:
                raise TypeError(f"plan key kind {kind!r} is taken by {_KINDS[kind].__name__}")
            _KINDS[kind] = cls

    def __str__(self) -> str:
        return str((self.kind, *astuple(self)))

    def map_sizes(self, fn: Callable) -> PlanKey:
        """This key with every size (an int, or :data:`SEQ`) replaced by ``fn(size)``."""
        return replace(self, **{name: map_size(getattr(self, name), fn) for name in self.SIZES})

    def ints(self) -> Iterator[int]:
        """Every int the key holds (sizes and indices; not flags)."""
        for value in astuple(self):
            yield from _ints(value)

    def to_json(self) -> list:
        """``[kind, *fields]``, tuples as lists."""
        return [self.kind, *(_lists(getattr(self, f.name)) for f in fields(self))]

    @staticmethod
    def from_json(data) -> PlanKey:
        """The key :meth:`to_json` wrote (a list, or its JSON text)."""
        if isinstance(data, str):
            data = json.loads(data)
        kind, *values = data
        if kind not in _KINDS:
            raise ValueError(f"unknown plan key kind {kind!r}; known: {sorted(_KINDS)}")
        return _KINDS[kind](*(_tuples(v) for v in values))


def map_size(value, fn: Callable):
    """``fn(value)`` for a size; None (no size) and flags unchanged."""
    return value if value is None or isinstance(value, bool) else fn(value)


def _ints(value) -> Iterator[int]:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, tuple):
        for v in value:
            yield from _ints(v)


def _lists(value):
    return [_lists(v) for v in value] if isinstance(value, tuple) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@dataclass(frozen=True)
class FullKey(PlanKey):
    """Every row through every layer (a cold cache, a dense step)."""

    kind: ClassVar[str] = "full"


@dataclass(frozen=True)
class RefreshKey(PlanKey):
    """Every row of a span of ``width`` rows (bucketed) through every layer: a row policy's
    dense step over its scope."""

    kind: ClassVar[str] = "refresh"
    SIZES: ClassVar[tuple[str, ...]] = ("width",)
    width: int | str


def encode_key(key: PlanKey) -> str:
    """A key as JSON text (``[kind, *fields]``)."""
    return json.dumps(key.to_json(), separators=(",", ":"))


def decode_key(data) -> PlanKey:
    """The inverse of :func:`encode_key`, from its text or its parsed list."""
    return PlanKey.from_json(data)


__all__ = ["FullKey", "PlanKey", "PlanKeyError", "RefreshKey", "SEQ", "decode_key", "encode_key", "map_size"]
