"""The one place that silences third-party noise during an export.

torch's ONNX exporter logs "torchvision is not installed. Skipping ..." each time it builds its
op registry (once per graph); the optimizer logs each constant graph output it leaves alone;
pytree raises a deprecation warning about its own internals inside torch.export (once per
graph); the exporter warns that tied dynamic axes share a name. Each is filtered here by its
logger or its message and category, only while an export runs; every other warning (ours
included) stays visible.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

# (category, message regex) of the warnings torch's exporters raise about their own workings
_WARNINGS = (
    # tied dims share one name ("batch" for every batch axis), as the step graphs intend
    (UserWarning, r".*axis name.*will not be used"),
    # pytree's deprecation of its own LeafSpec check, raised once per graph inside torch.export
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\)` is deprecated"),
)

# (logger name, message prefix) of log records about the exporters' own workings
_LOG_RECORDS = (
    # an optional package absent: logged each time the exporter builds its op registry
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
    # the optimizer's deduplication meets a constant graph output (a key's zero counts): expected
    ("onnx_ir.passes.common.initializer_deduplication", "Skipped deduplication of initializer"),
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def quiet_exporters():
    """Silence the exporters' known, harmless warnings and log lines while the block runs."""
    filters = []
    for name, prefix in _LOG_RECORDS:
        drop = _DropPrefix(prefix)
        logging.getLogger(name).addFilter(drop)
        filters.append((name, drop))
    try:
        with warnings.catch_warnings():
            for category, message in _WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for name, drop in filters:
            logging.getLogger(name).removeFilter(drop)


__all__ = ["quiet_exporters"]
