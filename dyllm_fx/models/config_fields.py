"""config.json settings read into a model's config dataclass, each checked against its field's
type and range with the key and the file named: a wrong value otherwise fails deep inside torch
(a fractional head count) or, worse, loads and decodes nonsense (a mask id past the vocabulary).

The checks themselves are the ones the API's arguments go through (``dyllm_fx.values``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..values import check_integer, check_number
from .checkpoint import CheckpointError

_FIX = "fix it in config.json, or copy the file again from the original checkpoint"


class ConfigReader:
    """Checks one config.json's settings; every error names the file and the key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {message}; {_FIX}")

    def fields(self, cls: type, raw: dict[str, Any]) -> dict[str, Any]:
        """The settings of ``raw`` that the dataclass ``cls`` declares, each of the declared
        type (a JSON integer where a float is declared is fine); None values are left out, so
        the dataclass default applies."""
        settings = {}
        for f in dataclasses.fields(cls):
            value = raw.get(f.name)
            if value is None:
                continue
            kind = str(f.type).split("|")[0].strip()
            try:
                if kind == "int":
                    check_integer(f.name, value)
                elif kind == "float":
                    check_number(f.name, value)
                elif kind == "bool" and not isinstance(value, bool):
                    raise TypeError(f"{f.name} must be true or false, got {type(value).__name__} {value!r}")
            except (TypeError, ValueError) as err:
                raise self.fail(str(err)) from None
            settings[f.name] = value
        return settings

    def positive(self, cfg: Any, *names: str) -> None:
        """Each named setting of ``cfg`` is > 0 (None: an optional field left out)."""
        for name in names:
            value = getattr(cfg, name)
            if value is not None and not value > 0:
                raise self.fail(f"{name} must be > 0, got {value}")

    def divides(self, cfg: Any, part: str, whole: str) -> None:
        """``cfg.<whole>`` is a multiple of ``cfg.<part>`` (the heads split the width evenly)."""
        p, w = getattr(cfg, part), getattr(cfg, whole)
        if w % p:
            raise self.fail(f"{whole}={w} is not a multiple of {part}={p}, so it does not split evenly")

    def token_ids(self, cfg: Any, vocab_key: str, vocab: int, *names: str) -> None:
        """Each named token id of ``cfg`` is a row of the ``vocab``-row embedding."""
        for name in names:
            value = getattr(cfg, name)
            if value is not None and not 0 <= value < vocab:
                raise self.fail(
                    f"{name}={value} is outside the vocabulary ({vocab_key}={vocab}: ids 0 to {vocab - 1})"
                )


__all__ = ["ConfigReader"]
