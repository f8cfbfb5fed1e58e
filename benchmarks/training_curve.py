"""The training curves of the embedded models, from the training.json each one ships with.

    python benchmarks/training_curve.py                       # docs/training_tiny_llada.png,
    docs/training_tiny_dream.png
    python benchmarks/training_curve.py --model runs/llada --out curve.png

Top panel: the mean masked-token loss of every logged window of steps, stages marked.
Bottom panel: exact match on the held-out prompts the training script scored along the way
(a few per task, vanilla decoding), per task and overall; each eval covers the tasks its
stage trained on, so "all" is over those tasks, not the whole suite.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import dyllm_fx
from dyllm_fx.analysis.plots import _figure, _save
from dyllm_fx.loading import EMBEDDED_MODELS, resolve_model_path

OUTPUTS = {"default": "docs/training_tiny_llada.png", "default-dream": "docs/training_tiny_dream.png"}


def plot_training(folder: Path, out: Path, title: str) -> Path:
    info = json.loads((folder / "training.json").read_text())
    stages = info["stages"]
    fig = _figure(figsize=(8, 6.5))
    loss_ax, acc_ax = fig.subplots(2, 1, sharex=True)
    boundary = 0
    for i, stage in enumerate(stages, start=1):
        curve = stage.get("curve", [])
        if curve:
            loss_ax.plot([c[0] for c in curve], [c[1] for c in curve], lw=0.9, label=f"stage {i}")
        if i > 1:
            for ax in (loss_ax, acc_ax):
                ax.axvline(boundary, color="0.6", ls=":", lw=0.8)
        boundary += stage["steps"]
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("masked-token loss (nats)")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend(fontsize=8)
    evals = [e for s in stages for e in s.get("evals", [])]
    if evals:
        tasks = list(evals[-1]["per_task"])
        steps = [e["step"] for e in evals]
        for task in tasks:
            acc_ax.plot(
                steps,
                [100 * e["per_task"].get(task, float("nan")) for e in evals],
                marker=".",
                lw=0.8,
                label=task,
            )
        acc_ax.plot(
            steps,
            [100 * e["accuracy"] for e in evals],
            color="black",
            lw=1.8,
            marker="o",
            label="all (the tasks of that eval)",
        )
        acc_ax.set_ylabel(f"held-out exact match (%), {evals[-1]['n_per_task']} per task")
        acc_ax.legend(fontsize=7, ncol=4)
    acc_ax.set_xlabel("optimizer step")
    acc_ax.set_ylim(-3, 103)
    acc_ax.grid(True, alpha=0.3)
    minutes = info.get("train_minutes")
    fig.suptitle(f"{title}: {info['steps']} steps, {minutes} min on 1 CPU thread", fontsize=11)
    return _save(fig, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="a checkpoint folder or embedded name (default: both embedded models)"
    )
    p.add_argument("--out", default=None, help="PNG path (with --model)")
    args = p.parse_args()
    names = [args.model] if args.model else list(EMBEDDED_MODELS)
    for name in names:
        try:
            folder = resolve_model_path(name)
        except FileNotFoundError as err:  # an embedded model this install does not ship
            print(f"{name}: skipped ({err})")
            continue
        if not (folder / "training.json").is_file():
            print(f"{name}: no training.json in {folder}, skipped")
            continue
        out = Path(args.out or OUTPUTS.get(name, f"{Path(name).name}_training.png"))
        model, _ = dyllm_fx.load(name, device="cpu")
        title = f"{name} ({model.architecture}, {len(model.layers)} layers)"
        print(f"wrote {plot_training(folder, out, title)}")


if __name__ == "__main__":
    main()
