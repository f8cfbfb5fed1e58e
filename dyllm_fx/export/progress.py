"""What an export tells its user while it works: the length warning before the work, the
output path checked before any tracing, and a progress bar over the plan keys."""

from __future__ import annotations

import warnings

from tqdm.auto import tqdm

from dyllm_fx.errors import DyllmWarning

# Tracing and lowering one plan key's step, per layer, in one process on a 2-core CPU
# (docs/export.md): the order of magnitude the length warning quotes before any key is timed.
SECONDS_PER_KEY_LAYER = 7.0
WARN_AFTER_SECONDS = 60.0  # an export expected to take longer than this says so before it starts


def warn_length(n_keys: int, n_layers: int, policy: str, workers: int = 1) -> float:
    """Warn, before the work, when exporting ``n_keys`` step graphs in ``workers`` processes
    will take a while; returns the estimate in seconds."""
    estimate = -(-n_keys // workers) * n_layers * SECONDS_PER_KEY_LAYER
    if estimate > WARN_AFTER_SECONDS:
        warnings.warn(
            f"exporting policy {policy!r} traces {n_keys} step graphs (one per plan key of the layout) in "
            f"{workers} process{'es' if workers > 1 else ''}: roughly {estimate / 60:.0f} min at the speed "
            "measured on a 2-core CPU (the progress bar refines it). For fewer graphs, export only the keys "
            "a calibration run meets: to_onnx(keys=...) with record_plan_keys (docs/export.md)",
            DyllmWarning,
            stacklevel=3,
        )
    return estimate


def key_bar(total: int, progress) -> tqdm:
    """The progress bar over plan keys (off when ``progress`` is False or a callable of the caller's)."""
    off = progress is False or callable(progress)
    return tqdm(total=total, desc="export", unit="key", disable=off, leave=False)


__all__ = ["SECONDS_PER_KEY_LAYER", "key_bar", "warn_length"]
