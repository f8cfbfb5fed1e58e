"""What an export tells its user while it works: the length warning before the work, the
output path checked before any tracing, and a progress bar over the graphs."""

from __future__ import annotations

import warnings

from tqdm.auto import tqdm

from dyllm_fx.errors import DyllmWarning

# Tracing, lowering and optimizing one branch's step, per layer, in one process on a 2-core CPU
# (docs/export.md): the order of magnitude the length warning quotes before any graph is timed.
SECONDS_PER_GRAPH_LAYER = 17.0
WARN_AFTER_SECONDS = 60.0  # an export expected to take longer than this says so before it starts


def warn_length(n_graphs: int, n_layers: int, policy: str, workers: int = 1) -> float:
    """Warn, before the work, when exporting ``n_graphs`` step graphs in ``workers`` processes
    will take a while; returns the estimate in seconds."""
    estimate = -(-n_graphs // workers) * n_layers * SECONDS_PER_GRAPH_LAYER
    if estimate > WARN_AFTER_SECONDS:
        warnings.warn(
            f"exporting policy {policy!r} traces {n_graphs} step graphs (one per kind of step of the "
            f"layout) in {workers} process{'es' if workers > 1 else ''}: roughly {estimate / 60:.0f} min at "
            "the speed measured on a 2-core CPU (the progress bar refines it). For fewer graphs, export "
            "only the keys a calibration run meets: to_onnx(keys=...) with record_plan_keys (docs/export.md)",
            DyllmWarning,
            stacklevel=3,
        )
    return estimate


def graph_bar(total: int, progress) -> tqdm:
    """The progress bar over the graphs (off when ``progress`` is False or a callable of the caller's)."""
    off = progress is False or callable(progress)
    return tqdm(total=total, desc="export", unit="graph", disable=off, leave=False)


__all__ = ["SECONDS_PER_GRAPH_LAYER", "graph_bar", "warn_length"]
