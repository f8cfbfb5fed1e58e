"""PNG figures: the saliency heatmap of one generation and the speed-accuracy (Pareto) plot.

matplotlib is an optional extra (``pip install "dyllm-fx[plot]"``), imported only when a
figure is drawn. Figures are built with matplotlib's object API (no pyplot, no GUI backend),
so they render on headless machines and never touch a user's pyplot state.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .saliency_trace import SaliencyTrace

BENCH_REQUIRED = ("method", "accuracy", "tokens_per_s")


def require_matplotlib():
    """The matplotlib Figure class, or an ImportError that names the extra to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            'plotting needs matplotlib: pip install "dyllm-fx[plot]" '
            '(from a checkout: pip install -e ".[plot]")'
        ) from err
    return Figure


def _figure(**kwargs):
    return require_matplotlib()(**kwargs)


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


def plot_saliency(trace: SaliencyTrace, out: str | Path, title: str | None = None) -> Path:
    """Heatmaps of one generation: active fraction (steps x layers) and, for ``trace.layer``,
    the active rows and (when measured) the context similarity (steps x positions).

    Returns the path written.
    """
    panels = [
        ("active fraction per layer", trace.active_fraction, "layer", dict(cmap="magma", vmin=0.0, vmax=1.0))
    ]
    panels.append(
        (
            f"layer {trace.layer}: recomputed rows (1 full, 0.5 attention only, 0 cached)",
            trace.active_rows,
            "position",
            dict(cmap="Greys", vmin=0.0, vmax=1.0),
        )
    )
    if trace.similarity is not None:
        lo = np.nanpercentile(trace.similarity, 2) if np.isfinite(trace.similarity).any() else 0.0
        panels.append(
            (
                f"layer {trace.layer}: cosine similarity of attention context to the previous step",
                trace.similarity,
                "position",
                dict(cmap="viridis", vmin=min(float(lo), 0.999), vmax=1.0),
            )
        )
    fig = _figure(figsize=(10, 2.2 + 2.6 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (name, data, ylabel, style) in zip(axes, panels):
        # Steps run left to right; NaN (not measured) shows as the light background.
        image = ax.imshow(
            np.ma.masked_invalid(data.T), aspect="auto", origin="lower", interpolation="nearest", **style
        )
        ax.set_facecolor("#f0e6ff")
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(ylabel)
        if ylabel == "position" and 0 < trace.prompt_length < data.shape[1]:
            ax.axhline(trace.prompt_length - 0.5, color="tab:red", linewidth=1)
            ax.text(0, trace.prompt_length, " response", color="tab:red", fontsize=8, va="bottom")
        fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
    axes[-1].set_xlabel("denoising step")
    steps = trace.active_fraction.shape[0]
    mean = float(trace.active_fraction.mean()) if steps else 0.0
    fig.suptitle(
        title or f"{trace.policy}: {steps} steps, mean active fraction {100 * mean:.1f}%", fontsize=11
    )
    return _save(fig, out)


def load_bench(path: str | Path) -> dict:
    """A methods-benchmark JSON (``{"rows": [{"method", "accuracy", "tokens_per_s", ...}], "device"}``),
    checked so that a malformed file fails with the row and field named."""
    path = Path(path)
    try:
        bench = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"bench file {str(path)!r} does not exist; write one with benchmarks/methods.py --json"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    validate_bench(bench, str(path))
    return bench


def validate_bench(bench, where: str = "bench") -> None:
    """Raise ValueError naming what is wrong with a bench dict."""
    rows = bench.get("rows") if isinstance(bench, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(
            f'{where}: expected {{"rows": [{{"method", "accuracy", "tokens_per_s", ...}}, ...], "device": '
            "...}"
        )
    for i, row in enumerate(rows):
        missing = [k for k in BENCH_REQUIRED if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{where}: row {i} lacks {', '.join(missing)}")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (no other point is both faster and more accurate),
    ordered by speed."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def _label_offsets(xs: list[float], ys: list[float], step: float = 11.0) -> list[float]:
    """Vertical label offsets (points) that stack the labels of points lying close together
    (same accuracy, speeds within 1.6x), so they do not print over each other."""
    offsets = [0.0] * len(xs)
    order = sorted(range(len(xs)), key=lambda i: (ys[i], xs[i]))
    for n, i in enumerate(order):
        for j in order[:n]:
            near = abs(ys[i] - ys[j]) < 0.5 and max(xs[i], xs[j]) <= 1.6 * max(min(xs[i], xs[j]), 1e-9)
            if near and offsets[i] <= offsets[j]:
                offsets[i] = offsets[j] + step
    return offsets


def plot_pareto(
    bench: dict | str | Path, out: str | Path, x: str = "tokens_per_s", title: str | None = None
) -> Path:
    """Accuracy against speed, one point per method, colored by active fraction, with the
    Pareto front drawn. ``x`` is ``"tokens_per_s"`` or ``"speedup"``. Returns the path written."""
    if not isinstance(bench, dict):
        bench = load_bench(bench)
    validate_bench(bench)
    rows = bench["rows"]
    if x not in ("tokens_per_s", "speedup"):
        raise ValueError(f"x must be 'tokens_per_s' or 'speedup', got {x!r}")
    if any(x not in r for r in rows):
        raise ValueError(f"some rows lack {x!r}; plot with x='tokens_per_s'")
    xs = [float(r[x]) for r in rows]
    ys = [100 * float(r["accuracy"]) for r in rows]
    colors = [float(r.get("active_fraction", np.nan)) for r in rows]
    fig = _figure(figsize=(7, 4.5 + 0.125 * len(rows)))
    ax = fig.subplots()
    points = ax.scatter(
        xs,
        ys,
        c=colors,
        cmap="viridis_r",
        vmin=0.0,
        vmax=1.0,
        s=60,
        edgecolors="black",
        zorder=3,
        plotnonfinite=True,
    )
    if all("accuracy_low" in r and "accuracy_high" in r for r in rows):  # 95% Wilson intervals (dyllm bench)
        low = [y - 100 * float(r["accuracy_low"]) for r, y in zip(rows, ys)]
        high = [100 * float(r["accuracy_high"]) - y for r, y in zip(rows, ys)]
        ax.errorbar(
            xs,
            ys,
            yerr=[low, high],
            fmt="none",
            ecolor="0.55",
            elinewidth=0.8,
            capsize=2,
            zorder=2.5,
            label="95% interval",
        )
    front = pareto_front(list(zip(xs, ys)))
    ax.plot(
        [xs[i] for i in front], [ys[i] for i in front], "--", color="tab:gray", zorder=2, label="Pareto front"
    )
    from matplotlib import ticker as mticker  # lazily, like every matplotlib import here

    if min(xs) > 0 and max(xs) / min(xs) > 4:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(mticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    # Points are numbered (stacked where they crowd) and named in a key beside the axes, so
    # names never print over each other.
    key = []
    offsets = _label_offsets(xs, ys, step=8.0)
    for n, ((r, px, py), dy) in enumerate(zip(zip(rows, xs, ys), offsets), start=1):
        ax.annotate(
            str(n),
            (px, py),
            textcoords="offset points",
            xytext=(5, 3 + dy),
            fontsize=8,
            weight="bold",
            arrowprops=dict(arrowstyle="-", color="0.6", lw=0.5) if dy else None,
        )
        extra = f", NFE {float(r['nfe']):.0f}" if "nfe" in r else ""
        key.append(f"{n:>2}  {r['method']} ({100 * float(r['accuracy']):.1f}%{extra})")
    fig.text(0.01, 0.01, "\n".join(key), fontsize=7, va="bottom", ha="left", family="monospace")
    height = fig.get_size_inches()[1]
    fig.subplots_adjust(bottom=(0.75 + 0.125 * len(key)) / height)  # room for the x label and the key
    ax.set_xlabel("tokens / s" if x == "tokens_per_s" else "speedup over vanilla (x)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.colorbar(points, ax=ax, label="active fraction")
    device = bench.get("device")
    # The title sits above the tallest stack of numbers (a stack over a point at the top of the
    # axes would otherwise print over it): offset + a line of 8-point text, in points.
    ax.set_title(
        title or ("speed vs accuracy" + (f" ({device})" if device else "")), pad=6 + max(offsets) + 12
    )
    return _save(fig, out)


def plot_ratios(groups: dict[str, dict[str, float]], out: str | Path, title: str | None = None) -> Path:
    """Horizontal bars of speed ratios (e.g. tokens/s against a baseline), one panel per group
    (``{group: {label: ratio}}``) stacked top to bottom on a shared ratio axis (long method
    labels keep to the left margin), with a line at 1 (the baseline)."""
    if not groups:
        raise ValueError("plot_ratios needs at least one group of ratios")
    heights = [max(len(ratios), 1) for ratios in groups.values()]
    fig = _figure(figsize=(8.0, 0.8 + 0.3 * sum(heights) + 0.45 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False, sharex=True, height_ratios=heights)[:, 0]
    for ax, (group, ratios) in zip(axes, groups.items()):
        labels = list(ratios)
        values = [ratios[label] for label in labels]
        y = np.arange(len(labels))
        ax.barh(y, values, color=["tab:green" if v >= 1 else "tab:gray" for v in values])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(group, fontsize=9)
    axes[-1].set_xlabel("ratio")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)
