"""Answer extractors: turn a model's response text into the answer that is scored.

An extractor is a function ``str -> str | None`` (None: no answer found, which scores as
wrong). :func:`exact_match` applies the same extractor to the reference, so a GSM8K
reference solution ("... #### 72") and a bare reference ("72") both work.

* ``identity``: the text as it is.
* ``strip``: the text without surrounding whitespace (the synthetic suite's default).
* ``gsm8k``: the number after the last ``####``; without one, the last number in the text
  (lm-eval's flexible fallback, since chat models seldom write ``####`` zero-shot).
* ``gsm8k_strict``: only the number after ``####`` (lm-eval's ``strict-match``).
* ``last_number``: the last number in the text (lm-eval's ``flexible-extract``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

Extractor = Callable[[str], "str | None"]

# A number as people write it: optional sign, thousands separators, decimals ("-1,234.50").
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_GSM8K_RE = re.compile(r"####\s*(" + _NUMBER + ")")


def normalize_number(text: str) -> str:
    """Canonical form of a number: no ``$`` or thousands commas, no trailing zeros
    ("1,234.50" -> "1234.5", "72.0" -> "72"). Text that is not a number comes back stripped."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return text.strip()
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def identity(text: str) -> str:
    return text


def strip(text: str) -> str:
    return text.strip()


def gsm8k_strict(text: str) -> str | None:
    found = _GSM8K_RE.findall(text)
    return normalize_number(found[-1]) if found else None


def last_number(text: str) -> str | None:
    found = _NUMBER_RE.findall(text)
    return normalize_number(found[-1]) if found else None


def gsm8k(text: str) -> str | None:
    strict = gsm8k_strict(text)
    return strict if strict is not None else last_number(text)


EXTRACTORS: dict[str, Extractor] = {
    "identity": identity,
    "strip": strip,
    "gsm8k": gsm8k,
    "gsm8k_strict": gsm8k_strict,
    "last_number": last_number,
}


def get_extractor(name: str | Extractor) -> Extractor:
    """An extractor by name (see :data:`EXTRACTORS`), or a callable passed through."""
    if callable(name):
        return name
    if name not in EXTRACTORS:
        raise ValueError(f"unknown extractor {name!r}; choose one of {sorted(EXTRACTORS)}")
    return EXTRACTORS[name]


def exact_match(prediction: str, reference: str, extractor: str | Extractor = "strip") -> bool:
    """Whether the extracted prediction equals the extracted reference.

    The reference goes through the extractor too; when nothing can be extracted from it
    (a bare "72" has no ``####``), the reference itself is the answer, with numbers
    normalized ("1,234" -> "1234").
    """
    extract = get_extractor(extractor)
    predicted = extract(prediction)
    if predicted is None:
        return False
    expected = extract(reference)
    if expected is None:
        expected = normalize_number(reference)
    return predicted == expected
