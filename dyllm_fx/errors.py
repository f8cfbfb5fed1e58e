"""The project's own error and warning types.

Every error dyllm-fx raises on bad input is a ``ValueError`` / ``TypeError`` /
``FileNotFoundError`` (or ``ImportError`` for a missing optional package) whose message names
what is wrong and the fix. The ``dyllm`` command line prints such errors as one line and exits
with status 2; anything else is a bug and says so (``--debug`` shows the traceback).

This module imports nothing heavy, so the command line can use it before torch is loaded.
"""

from __future__ import annotations


class DyllmError(Exception):
    """Base of the errors dyllm-fx raises on purpose (bad input, unsupported models)."""


class UsageError(DyllmError, ValueError):
    """An argument or option that is wrong as given; the message says what to pass instead."""


class MethodNotApplicable(UsageError):
    """A method (policy) that cannot run on this model family at all, whatever its parameters;
    the message says why and what to use instead."""


class MissingDependencyError(DyllmError, ImportError):
    """An optional package a feature needs is not installed; the message gives the pip command."""


class EngineStoppedError(DyllmError, RuntimeError):
    """The serving engine cannot go on (a tensor-parallel rank was lost, or a bug stopped its
    thread); the requests it held were answered with this error."""


class DyllmWarning(UserWarning):
    """Something dyllm-fx runs as asked but that probably does not do what the user wants."""


class UnknownCharactersWarning(DyllmWarning):
    """A prompt holds characters the tokenizer maps to its unknown token."""


class EmptyResponseWarning(DyllmWarning):
    """A response is empty (EOS first) although the model decoded tokens after that EOS, or the
    response window differs from the one the model was trained with."""


__all__ = [
    "DyllmError",
    "EngineStoppedError",
    "DyllmWarning",
    "EmptyResponseWarning",
    "MissingDependencyError",
    "UnknownCharactersWarning",
    "UsageError",
]
