"""Real denoising schedules replayed at LLaDA-8B's layer shape: tokens/s of every method, its
ratio to the compiled dual cache, DyLLM's targets (issue 33), in one run.

    python benchmarks/schedule_replay.py                    # both embedded models, batch 1 and 8
    python benchmarks/schedule_replay.py --smoke            # tiny replay model, one round (a test)

1. **Record.** Each embedded model (``default``, ``default-dream``) generates, eagerly, at each
   method's defaults and again under threshold 0.9 (and the options below): every step's plan
   key (kind, span width, capacities), rerun, rows per layer, commits, and DyLLM's context
   cosines (``replay.py``).
2. **Replay.** The same steps (canvases, host information, plan keys, DyLLM's salient rows)
   run through the compiled step functions (``transform(compile=True)``) of a model with
   LLaDA-8B's layer (``synthetic.llada8b_layer_model``: heads of 128, MLP 3x d_model, d_model
   ``--d-model``), as many layers as the recorded model, random weights, the recorded model's
   vocabulary, at the recording's sequence layout (batch 1: the first held-out prompt; batch 8:
   the first eight, left padded). A replay whose plan keys, reruns or rows per layer differ from
   the recording's fails the run.
3. **Report.** Per method the fastest of ``--rounds`` round-robin replays after one warm-up
   (the compiles), as tokens/s (batch x gen_length / seconds of the engine's steps; sampling is
   not replayed) and as ratios to the compiled dual cache with the same decoding and to vanilla;
   then DyLLM's targets, met or not, with the capacity-1 floor of ``dyllm_floor.py`` and the
   best option measured beside them.

Vanilla is the dense policy: every row of every layer at every step, through the same engine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # noqa: E402 (run from anywhere)

import torch
from dyllm_floor import FLOOR, LEAN
from replay import Schedule, drifted, record, replay, replayer
from synthetic import HEAD_DIM, MLP_RATIO, llada8b_layer_model

import dyllm_fx
from dyllm_fx.eval.synthetic_tasks import held_out_set
from dyllm_fx.runtime.engine import StepEngine
from dyllm_fx.runtime.policies.dyllm import FLAT_ROWS

THRESHOLD = 0.9
GEN = dict(gen_length=64, block_length=32, steps=64)
SMOKE_GEN = dict(gen_length=16, block_length=8, steps=16)
# the methods at their authors' defaults: the rows of ``dyllm bench`` without a variant
DEFAULTS = ("vanilla", "prefix_cache", "dual_cache", "dllm_cache", "es_dllm", "dyllm", "dual_cache+dyllm")
SMOKE_DEFAULTS = ("vanilla", "dual_cache", "dllm_cache", "es_dllm", "dyllm", "dual_cache+dyllm")
SMOKE_THRESHOLD = ("dual_cache", "dual_cache+dyllm")


@dataclass(frozen=True)
class Method:
    label: str
    policy: str
    config: dict = field(default_factory=dict)
    threshold: float | None = None
    option: bool = False  # a project option beside the defaults (what closes a target's gap)

    @property
    def decoding(self) -> str:
        return "threshold" if self.threshold is not None else "steps"


def methods(smoke: bool) -> list[Method]:
    """Every default under both decodings, then the DyLLM options the targets are checked with:
    the flat rows option, the capacity-1 floor and the lean floor (``dyllm_floor.py``)."""
    out = []
    for threshold in (None, THRESHOLD):
        suffix = "" if threshold is None else f" + threshold {threshold}"
        names = DEFAULTS if not smoke else SMOKE_DEFAULTS if threshold is None else SMOKE_THRESHOLD
        out += [Method(f"{m}{suffix}", m, threshold=threshold) for m in names]
    frozen = {**LEAN, "full_query_interval": None}
    approximate = {**FLOOR, "overflow": "approximate"}  # no rerun: the step's cost floor
    options = [
        ("dyllm", "floor: capacity 1", FLOOR, None),
        ("dyllm", "floor: capacity 1, approximate overflow", approximate, None),
        ("dyllm", "floor: capacity 1, cached softmax stats, frozen prompt", frozen, None),
        ("dual_cache+dyllm", "flat rows", FLAT_ROWS, None),
        ("dual_cache+dyllm", "floor: capacity 1", FLOOR, None),
        ("dual_cache+dyllm", "floor: capacity 1, cached softmax stats", LEAN, None),
        ("dual_cache+dyllm", "floor: capacity 1, approximate overflow", approximate, None),
        ("dual_cache+dyllm", "flat rows", FLAT_ROWS, THRESHOLD),
        ("dual_cache+dyllm", "floor: capacity 1", FLOOR, THRESHOLD),
        ("dual_cache+dyllm", "floor: capacity 1, cached softmax stats", LEAN, THRESHOLD),
    ]
    if smoke:
        options = options[:1] + options[4:5]
    for policy, what, config, threshold in options:
        suffix = "" if threshold is None else f" + threshold {threshold}"
        out.append(Method(f"{policy}{suffix}: {what}", policy, dict(config), threshold, option=True))
    return out


@dataclass(frozen=True)
class Target:
    """``method`` at least ``ratio`` times ``baseline`` (same model, batch and decoding)."""

    name: str
    method: str
    baseline: str
    ratio: float
    family: str  # the option rows that may close the gap: labels starting with this
    threshold: float | None = None

    def floor_labels(self) -> tuple[str, ...]:
        """The floor rows, first found counts: capacity 1 without reruns (the step's cost floor),
        then capacity 1 as ``dyllm_floor.py`` runs it (an overflow re-runs the step)."""
        return (
            f"{self.family}: floor: capacity 1, approximate overflow",
            f"{self.family}: floor: capacity 1",
        )


TARGETS = (
    Target("composed >= 2.0x dual cache", "dual_cache+dyllm", "dual_cache", 2.0, "dual_cache+dyllm"),
    Target(
        "composed + threshold >= 1.2x dual cache + threshold",
        f"dual_cache+dyllm + threshold {THRESHOLD}",
        f"dual_cache + threshold {THRESHOLD}",
        1.2,
        f"dual_cache+dyllm + threshold {THRESHOLD}",
    ),
    Target("dyllm alone >= 3x vanilla", "dyllm", "vanilla", 3.0, "dyllm"),
)


def prompts_for(batch: int) -> list[str]:
    examples = held_out_set(max(1, -(-batch // 7)))
    if len(examples) < batch:
        raise SystemExit(f"only {len(examples)} held-out prompts; --batch {batch} needs more")
    return [e.prompt for e in examples[:batch]]


def record_all(name: str, batch: int, chosen: list[Method], gen: dict) -> tuple[object, list[Schedule]]:
    """The embedded model ``name`` and the schedules of every method on it at ``batch`` (eager,
    on the CPU)."""
    model, tokenizer = dyllm_fx.load(name, dtype=torch.float32, device="cpu")
    fast = dyllm_fx.transform(model, policy="dense")  # each recording sets its own policy
    prompts = prompts_for(batch)
    return model, [
        record(fast, tokenizer, prompts, m.label, m.policy, m.config, m.threshold, gen) for m in chosen
    ]


def replay_all(schedules: list[Schedule], model, compile, device: str, rounds: int, warmup: int, log) -> dict:
    """label -> (fastest seconds, records, graphs, plans forced): ``warmup`` replays of each schedule (the
    compiles), then ``rounds`` round-robin replays. Raises when a replay drifts from its
    recording."""
    program = dyllm_fx.transform(model, policy="dense").engine.program  # one trace for every method
    engines = [StepEngine(program, replayer(s), compile=compile) for s in schedules]
    best: dict[str, tuple[float, list, int]] = {}
    for r in range(warmup + rounds):
        for schedule, engine in zip(schedules, engines):
            seconds, records = replay(engine, schedule, device)
            problems = drifted(schedule, records)
            if problems:
                raise RuntimeError(f"{schedule.method}: the replay drifted: " + "; ".join(problems[:3]))
            which = "warm-up" if r < warmup else f"round {r - warmup + 1}"
            log(f"  {which} {schedule.method}: {seconds:.2f} s")
            if r < warmup:
                continue
            if schedule.method not in best or seconds < best[schedule.method][0]:
                best[schedule.method] = (seconds, records, engine.compiler.graphs, engine.policy.drift)
    return best


def summarise(model_name: str, batch: int, chosen: list[Method], schedules, best, gen: dict) -> list[dict]:
    rows = []
    by_label = {s.method: s for s in schedules}
    for m in chosen:
        seconds, records, graphs, drift = best[m.label]
        schedule = by_label[m.label]
        sparse = [r for r in records if r.kind not in ("full", "refresh")]
        rows.append(
            {
                "model": model_name,
                "batch": batch,
                "method": m.label,
                "policy": m.policy,
                "config": m.config,
                "threshold": m.threshold,
                "option": m.option,
                "steps": len(records),
                "reruns": sum(s.rerun for s in schedule.steps),
                "seq_len": schedule.seq_len,
                "rows_per_layer": sum(sum(r.active) for r in records)
                / (len(records) * len(records[0].active)),
                "sparse_steps": len(sparse),
                "seconds": seconds,
                "tokens_per_s": batch * gen["gen_length"] / seconds,
                "graphs": graphs,
                # steps whose plan the policy did not choose itself from the replayed inputs
                "plans_forced": drift,
            }
        )
    base = {(r["threshold"] is None): r for r in rows if r["policy"] == "dual_cache" and not r["option"]}
    vanilla = {(r["threshold"] is None): r for r in rows if r["policy"] == "vanilla"}
    for r in rows:
        same = r["threshold"] is None
        r["vs_dual_cache"] = r["tokens_per_s"] / base[same]["tokens_per_s"] if same in base else None
        r["vs_vanilla"] = r["tokens_per_s"] / vanilla[same]["tokens_per_s"] if same in vanilla else None
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    """Each target per (model, batch): its ratio, met or not, the floor's and the best option's."""
    out = []
    groups = sorted({(r["model"], r["batch"]) for r in rows})
    for model, batch in groups:
        here = {r["method"]: r for r in rows if r["model"] == model and r["batch"] == batch}
        for t in TARGETS:
            if t.method not in here or t.baseline not in here:
                continue
            base = here[t.baseline]["tokens_per_s"]
            ratio = here[t.method]["tokens_per_s"] / base
            options = [r for label, r in here.items() if r["option"] and label.startswith(t.family + ":")]
            floor = next((here[label] for label in t.floor_labels() if label in here), None)
            best = max(options, key=lambda r: r["tokens_per_s"], default=None)
            out.append(
                {
                    "model": model,
                    "batch": batch,
                    "target": t.name,
                    "needed": t.ratio,
                    "ratio": ratio,
                    "met": ratio >= t.ratio,
                    "floor": floor["tokens_per_s"] / base if floor else None,
                    "floor_method": floor["method"] if floor else None,
                    "best_option": best["method"] if best else None,
                    "best_option_ratio": best["tokens_per_s"] / base if best else None,
                }
            )
    return out


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(header: str, rows: list[dict], targets: list[dict]) -> str:
    lines = [header, ""]
    lines.append(
        "| model | batch | method | steps (sparse, reruns) | rows per layer | seconds | tokens/s "
        "| vs dual_cache | vs vanilla |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['method']} | {r['steps']} ({r['sparse_steps']}, "
            f"{r['reruns']}) | {r['rows_per_layer']:.1f} of {r['seq_len']} | {r['seconds']:.3f} "
            f"| {r['tokens_per_s']:.1f} | {_x(r['vs_dual_cache'])} | {_x(r['vs_vanilla'])} |"
        )
    lines += ["", "| model | batch | DyLLM target | ratio | met | floor (capacity 1) | best option |"]
    lines.append("|---|---|---|---|---|---|---|")
    for t in targets:
        best = "-" if t["best_option"] is None else f"{t['best_option']}: {_x(t['best_option_ratio'])}"
        lines.append(
            f"| {t['model']} | {t['batch']} | {t['target']} | {_x(t['ratio'])} "
            f"| {'met' if t['met'] else 'not met'} | {_x(t['floor'])} | {best} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path, eager: bool = False) -> Path | None:
    """Bars of each method's ratio to the dual cache, per model and batch (None without
    matplotlib)."""
    from dyllm_fx.analysis.plots import plot_ratios

    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["vs_dual_cache"] is not None:
            groups.setdefault(f"{r['model']}, batch {r['batch']}", {})[r["method"]] = r["vs_dual_cache"]
    mode = "eager" if eager else "compiled"
    try:
        return plot_ratios(groups, out, f"tokens/s against the {mode} dual cache (same decoding)")
    except ImportError as err:
        print(f"no plot: {err}", file=sys.stderr)
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help="tiny replay model (d 128), eager, one round, fewer methods"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--d-model", type=int, default=None, help=f"default 1024 (--smoke: 128); heads of {HEAD_DIM}"
    )
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,8; --smoke: 1)")
    p.add_argument("--models", default=None, help="default: default,default-dream (--smoke: default)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds after the warm-up (default 1)")
    p.add_argument("--eager", action="store_true", help="replay the eager step instead of the compiled one")
    p.add_argument("--methods", default=None, help="semicolon-separated method labels to run (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the rows, targets and schedules here")
    p.add_argument("--markdown", default=None, help="write the tables here")
    p.add_argument("--plot", default=None, help="write the ratio plot here (PNG; needs matplotlib)")
    args = p.parse_args(argv)
    d_model = args.d_model or (128 if args.smoke else 1024)
    if d_model <= 0 or d_model % HEAD_DIM:
        p.error(f"--d-model must be a positive multiple of {HEAD_DIM} (LLaDA-8B's head size); got {d_model}")
    try:
        batches = [int(b) for b in (args.batch or ("1" if args.smoke else "1,8")).split(",")]
    except ValueError:
        p.error(f"--batch takes comma-separated integers, e.g. 1,8; got {args.batch!r}")
    if any(b < 1 for b in batches):
        p.error(f"--batch sizes must be >= 1; got {args.batch!r}")
    models = (args.models or ("default" if args.smoke else "default,default-dream")).split(",")
    rounds = args.rounds if args.rounds is not None else 1
    if rounds < 1:
        p.error(f"--rounds must be >= 1; got {rounds}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu")
    torch.set_num_threads(args.threads)
    gen = SMOKE_GEN if args.smoke else GEN
    chosen = methods(args.smoke)
    dtype = getattr(torch, args.dtype)
    # the smoke run steps eagerly: compiling a graph per plan key takes minutes on a CPU
    compile = not (args.eager or args.smoke)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(";") if m.strip()]
        unknown = sorted(set(wanted) - {m.label for m in chosen})
        if unknown:
            p.error(f"--methods: unknown labels {unknown}; choose from {[m.label for m in chosen]}")
        chosen = [m for m in chosen if m.label in wanted]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows, plans = [], {}
    for name in models:
        for batch in batches:
            log(f"{name}, batch {batch}: recording {len(chosen)} schedules")
            recorded, schedules = record_all(name, batch, chosen, gen)
            n_layers = len(schedules[0].steps[0].active)  # one replayed layer per recorded one
            mask_id = recorded.diffusion.mask_token_id
            model = llada8b_layer_model(d_model, n_layers, recorded.config.vocab_size, mask_id)
            model = model.to(device=args.device, dtype=dtype)
            best = replay_all(schedules, model, compile, args.device, rounds, int(compile), log)
            rows += summarise(name, batch, chosen, schedules, best, gen)
            plans[f"{name}, batch {batch}"] = [s.summary(mask_id) for s in schedules]
    targets = check_targets(rows)
    mode = "compiled" if compile else "eager"
    header = (
        f"{args.device} ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}; replay model: d_model {d_model}, "
        f"{d_model // HEAD_DIM} heads of {HEAD_DIM}, "
        f"MLP {MLP_RATIO * d_model}, {n_layers} layers, {args.dtype}, random weights, {mode}; "
        f"generation {gen['gen_length']}, block {gen['block_length']}, {gen['steps']} steps (or threshold "
        f"{THRESHOLD}); fastest of {rounds} round(s)" + (" after a warm-up (the compiles)" if compile else "")
    )
    table = markdown(header, rows, targets)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        result = {
            "header": header,
            "argv": list(argv) if argv is not None else sys.argv[1:],
            "rows": rows,
            "targets": targets,
            "schedules": plans,
        }
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(rows, Path(args.plot), eager=args.eager)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
