"""The one place that silences third-party noise during an export.

torch's ONNX exporter logs "torchvision is not installed. Skipping ..." each time it builds its
op registry (once per graph), and torch.export / torch.onnx / pytorch's pytree raise deprecation
warnings about their own internals that a user cannot act on. Each is filtered here by its
logger or its message and category, only while an export runs; every other warning (ours
included) stays visible.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

# (category, message regex) of warnings raised inside torch's exporters about torch's own code
_WARNINGS = (
    # the exporter warns that tied dims share one name ("batch" for every batch axis): expected
    (UserWarning, r".*axis name.*will not be used"),
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\)` is deprecated"),
    (FutureWarning, r".*LeafSpec.*is deprecated"),
    (DeprecationWarning, r".*torch\.export.*"),
    (DeprecationWarning, r".*torch\.onnx.*"),
    (FutureWarning, r".*torch\.export.*"),
    (FutureWarning, r".*torch\.onnx.*"),
)
_MODULES = r"(torch\.onnx|torch\.export|torch\._export|torch\.utils\._pytree|onnxscript|onnx_ir)(\..*)?"

# (logger name, message prefix) of log records that only say an optional package is absent
_LOG_RECORDS = (("torch.onnx._internal.exporter._registration", "torchvision is not installed"),)


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
            for category in (DeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category, module=_MODULES)
            yield
    finally:
        for name, drop in filters:
            logging.getLogger(name).removeFilter(drop)


__all__ = ["quiet_exporters"]
