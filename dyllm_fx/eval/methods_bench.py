"""``dyllm bench``: every method on one engine, side by side, on held-out task prompts.

Each method is a policy (or a composition, or vanilla), optionally with threshold parallel
decoding. All of them run in one process on the same prompts, vanilla first, so speedups are
ratios measured in the same run. Accuracy is exact match of the response, with its 95% Wilson
interval; each method is compared with vanilla prompt by prompt (prompts won, prompts lost,
exact McNemar p; see :mod:`dyllm_fx.eval.significance`); agreement is the fraction of response tokens
identical to vanilla's on the same prompts.

On a Dream-architecture model (logit shift 1) the rows without a threshold use Dream's default
sampler (``alg="entropy"``), which has no probability to compare with a threshold; the
threshold rows decode with ``alg="maskgit_plus"`` (the top-1 probability as confidence), the
Dream sampler Fast-dLLM's threshold decoding uses (:data:`DREAM_THRESHOLD_ALG`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..generation import generate
from ..runtime.policies.dyllm import FLAT_ROWS
from .agreement import AgreementCounter
from .significance import Paired, format_accuracy, format_p, wilson_interval
from .synthetic_tasks import HELD_OUT_PER_TASK as DEFAULT_N_PER_TASK
from .synthetic_tasks import TASKS, Example, held_out_set

# The Dream sampler of the threshold rows (the top-1 probability as confidence).
DREAM_THRESHOLD_ALG = "maskgit_plus"


# Fast-dLLM's block caches as its reference code writes them (dyllm_fx/eval/plain_loop_baseline.py): the
# "plain loop" rows the engine's compiled caches are measured against.
REFERENCE_LOOPS = {"fastdllm-loop:dual": "dual", "fastdllm-loop:prefix": "prefix"}


@dataclass(frozen=True)
class Method:
    label: str
    policy: str  # "vanilla", a policy name / composition for transform(), or a REFERENCE_LOOPS key
    params: dict = field(default_factory=dict)
    threshold: float | None = None

    @property
    def transformed(self) -> bool:
        return self.policy != "vanilla" and self.policy not in REFERENCE_LOOPS


def default_methods(threshold: float = 0.9, tau: float | None = None) -> list[Method]:
    """The baselines and the methods at their authors' defaults, then the project's variants of
    them (one row each, named after what they change), alone, composed and with threshold
    decoding. ``tau`` overrides DyLLM's threshold (default: the per-model preset of the official
    code, 0.99 for LLaDA)."""
    dy = {} if tau is None else {"tau": tau}
    flat = FLAT_ROWS  # one selection over the whole batch per layer, for the MLP and the next K/V
    return [
        Method("vanilla", "vanilla"),
        Method("vanilla + threshold", "vanilla", threshold=threshold),
        Method("prefix_cache", "prefix_cache"),
        Method("dual_cache", "dual_cache"),
        Method("plain loop: prefix cache", "fastdllm-loop:prefix"),
        Method("plain loop: dual cache", "fastdllm-loop:dual"),
        Method("dual_cache + threshold (Fast-dLLM)", "dual_cache", threshold=threshold),
        Method("dllm_cache", "dllm_cache"),
        # ES-dLLM, official: hidden-state variation, the block as the window (a dual cache)
        Method("es_dllm", "es_dllm"),
        Method("es_dllm: value variation", "es_dllm", {"variation": "value"}),
        Method("es_dllm: key variation", "es_dllm", {"variation": "key"}),
        Method("es_dllm + threshold", "es_dllm", threshold=threshold),
        # DyLLM, official: 4 dense steps then sparse; the whole sequence queried every 4th step
        Method("dyllm", "dyllm", dy),
        # the capacity's overflow approximated instead of re-run: what exactness costs or saves
        Method("dyllm: approximate overflow", "dyllm", {**dy, "overflow": "approximate"}),
        Method("dyllm: cached softmax stats", "dyllm", {**dy, "cached_softmax_stats": True}),
        Method("dyllm: frozen prompt", "dyllm", {**dy, "full_query_interval": None}),
        Method(
            "dyllm: refresh at blocks and every 16",
            "dyllm",
            {**dy, "refresh_at_block": True, "refresh_interval": 16},
        ),
        Method("dyllm: batch-wide MLP rows", "dyllm", {**dy, "mlp_selection": "batch"}),
        Method("dyllm: flat rows", "dyllm", {**dy, **flat}),
        Method("dual_cache+dyllm", "dual_cache+dyllm", dy),
        Method("dual_cache+dyllm: batch-wide MLP rows", "dual_cache+dyllm", {**dy, "mlp_selection": "batch"}),
        Method("dual_cache+dyllm: flat rows", "dual_cache+dyllm", {**dy, **flat}),
        Method("dyllm + threshold", "dyllm", dy, threshold=threshold),
        Method(
            "dyllm + threshold: approximate overflow",
            "dyllm",
            {**dy, "overflow": "approximate"},
            threshold=threshold,
        ),
        Method("dual_cache+dyllm + threshold", "dual_cache+dyllm", dy, threshold=threshold),
        Method(
            "dual_cache+dyllm: flat rows + threshold", "dual_cache+dyllm", {**dy, **flat}, threshold=threshold
        ),
    ]


@dataclass
class MethodResult:
    method: str
    accuracy: float
    tokens_per_s: float
    speedup: float
    active_fraction: float
    nfe: float  # forward evaluations per batch
    agreement: float
    seconds: float
    compiled: bool = False  # the step compiled whole by inductor
    graphs: int = 0  # inductor graphs the compiled step needed (one per plan key and shape)
    overflow: int = 0  # DyLLM: rows that qualified beyond a step's capacity, over the whole run
    correct: int = 0
    n: int = 0
    accuracy_low: float = 0.0  # 95% Wilson interval of the accuracy
    accuracy_high: float = 1.0
    won: int = 0  # prompts this method gets right and vanilla wrong
    lost: int = 0  # prompts vanilla gets right and this method wrong
    mcnemar_p: float = 1.0  # exact two-sided McNemar test of won against lost
    per_task: dict = field(default_factory=dict)  # task -> {"correct", "n"}


def sampler_params(model, method: Method) -> dict:
    """Decoding arguments of a method beyond its threshold: a threshold row of a Dream model
    needs a probability confidence (``alg=DREAM_THRESHOLD_ALG``); every other row uses the
    model's default sampler."""
    shift = getattr(getattr(model, "diffusion", None), "logits_shift", 0)
    if method.threshold is not None and shift:
        return {"alg": DREAM_THRESHOLD_ALG}
    return {}


def _prepare(
    model, tokenizer, examples: list[Example], method: Method, gen: dict, batch_size: int, compile: bool
):
    """The method's model, warmed up on every batch shape of the run (so a compiled step has
    compiled all its graphs before the timing)."""
    from ..policy_setup import apply_policy
    from .plain_loop_baseline import FastDLLMReference

    if method.policy in REFERENCE_LOOPS:
        target = FastDLLMReference(model, REFERENCE_LOOPS[method.policy])
    else:
        target = apply_policy(model, method.policy, method.params, compile=compile)
    sizes = {min(batch_size, len(examples) - i) for i in range(0, len(examples), batch_size)}
    for size in sorted(sizes):
        warm = [e.prompt for e in examples[:size]]
        generate(
            target,
            tokenizer,
            warm,
            threshold=method.threshold,
            progress=False,
            **sampler_params(model, method),
            **gen,
        )
    return target


def _timed_pass(
    target, tokenizer, examples: list[Example], method: Method, gen: dict, batch_size: int, decoding: dict
):
    """One generation of every example in batches: (responses, texts, nfe, seconds, active, overflow)."""
    responses, texts, nfe, seconds, active, overflow = [], [], 0, 0.0, [], 0
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        start = time.perf_counter()
        out = generate(
            target,
            tokenizer,
            [e.prompt for e in batch],
            threshold=method.threshold,
            progress=False,
            **decoding,
            **gen,
        )
        seconds += time.perf_counter() - start
        nfe += out.stats.nfe
        responses.append(out.responses)
        texts += out.texts
        overflow += sum(out.stats.overflow)
        engine = getattr(target, "engine", None)
        active += [r.active_fraction for r in engine.records] if engine is not None else [1.0] * out.stats.nfe
    return responses, texts, nfe, seconds, sum(active) / max(len(active), 1), overflow


def run_bench(
    model,
    tokenizer,
    examples: list[Example],
    methods: list[Method] | None = None,
    batch_size: int = 16,
    gen_length: int = 64,
    block_length: int = 32,
    steps: int | None = None,
    compile: bool | str = False,
    progress: bool | None = None,
    repeats: int = 1,
) -> dict:
    """Run every method on ``examples``; returns {"rows": [...], "settings": {...}} (the JSON
    ``dyllm plot pareto`` reads). The first method must be vanilla (the speed and agreement
    reference).

    ``compile``: every transformed method also runs with its step compiled whole by inductor
    (or the torch.compile backend named), as a row of its own beside the eager one
    (``[compiled]``), with the number of graphs it compiled (fullgraph: a graph break would fail
    the run, so there are none).

    With ``repeats`` > 1 the methods are timed round-robin, ``repeats`` passes over all of
    them, and each keeps its fastest pass: load from other processes on a shared machine only
    ever adds time, and interleaving spreads what it adds over every method alike.
    """
    methods = methods or default_methods()
    if methods[0].policy != "vanilla" or methods[0].threshold is not None:
        raise ValueError(
            "the first method must be plain vanilla: it is the reference for speedup and agreement"
        )
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    gen = dict(gen_length=gen_length, block_length=block_length, steps=steps or gen_length)
    runs = [(m, False) for m in methods]
    if compile:
        runs = [r for m in methods for r in ([(m, False), (m, compile)] if m.transformed else [(m, False)])]
    targets = [
        _prepare(model, tokenizer, examples, m, gen, batch_size, compiled)
        for m, compiled in tqdm(runs, desc="warm-up", unit="method", disable=progress is False)
    ]
    methods = [m for m, _ in runs]
    passes: list[list[tuple]] = [[] for _ in methods]
    bar = tqdm(total=repeats * len(methods), desc="methods", unit="run", disable=progress is False)
    for _ in range(repeats):
        for i, (method, target) in enumerate(zip(methods, targets)):
            passes[i].append(
                _timed_pass(
                    target, tokenizer, examples, method, gen, batch_size, sampler_params(model, method)
                )
            )
            bar.update()
    bar.close()
    rows, reference, ref_correct, ref_tps = [], None, None, None
    n_tokens = len(examples) * gen_length
    for (method, compiled), target, timed in zip(runs, targets, passes):
        responses, texts, nfe, _, active, overflow = timed[
            0
        ]  # decoding is deterministic: every pass is the same
        seconds = min(run[3] for run in timed)
        hits = [t.strip() == e.answer.strip() for t, e in zip(texts, examples)]
        if reference is None:
            reference, ref_correct = responses, hits
        agreement = AgreementCounter()
        for batch, ref in zip(responses, reference):
            agreement.update(batch, ref)
        tps = n_tokens / seconds
        ref_tps = ref_tps or tps
        engine = getattr(target, "engine", None)
        correct = sum(hits)
        low, high = wilson_interval(correct, len(examples))
        paired = Paired.of(hits, ref_correct)
        per_task: dict[str, dict] = {}
        for hit, ex in zip(hits, examples):
            score = per_task.setdefault(ex.task, {"correct": 0, "n": 0})
            score["correct"] += int(hit)
            score["n"] += 1
        rows.append(
            MethodResult(
                method=method.label + (" [compiled]" if compiled else ""),
                accuracy=correct / len(examples),
                tokens_per_s=tps,
                speedup=tps / ref_tps,
                active_fraction=active,
                nfe=nfe / -(-len(examples) // batch_size),
                agreement=agreement.value,
                seconds=seconds,
                compiled=bool(compiled),
                graphs=engine.compiler.graphs if compiled else 0,
                overflow=overflow,
                correct=correct,
                n=len(examples),
                accuracy_low=low,
                accuracy_high=high,
                won=paired.won,
                lost=paired.lost,
                mcnemar_p=paired.p_value,
                per_task=per_task,
            )
        )
    return {
        "rows": [asdict(r) for r in rows],
        "settings": {
            **gen,
            "batch_size": batch_size,
            "examples": len(examples),
            "compile": compile,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "threshold_alg": DREAM_THRESHOLD_ALG
            if getattr(getattr(model, "diffusion", None), "logits_shift", 0)
            else None,
        },
        "device": str(next(model.parameters()).device),
    }


# The printed tables stay within TABLE_WIDTH columns: the figures are split over three tables
# (accuracy and speed; cost; accuracy per task), and the JSON holds every figure of every row.
TABLE_WIDTH = 120


def format_table(bench: dict) -> str:
    """Accuracy and speed: accuracy with its 95% Wilson interval and, against vanilla on the same
    prompts, prompts won / lost and the exact McNemar p; tokens/s and the speedup over vanilla."""
    lines = [
        "| method | accuracy [95% CI] | won / lost vs vanilla | McNemar p | tokens/s | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in bench["rows"]:
        n = r.get("n") or bench.get("settings", {}).get("examples", 0)
        correct = r.get("correct", round(r["accuracy"] * n))
        lines.append(
            f"| {r['method']} | {format_accuracy(correct, n)} | {r.get('won', 0)} / {r.get('lost', 0)} | "
            f"{format_p(r.get('mcnemar_p', 1.0))} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x |"
        )
    compiled = [r for r in bench["rows"] if r.get("compiled")]
    if compiled:
        lines.append("")
        lines.append(
            "compiled steps (torch.compile fullgraph=True: no graph breaks), inductor graphs per method: "
            + ", ".join(f"{r['method'].removesuffix(' [compiled]')} {r['graphs']}" for r in compiled)
        )
    overflowed = [r for r in bench["rows"] if r.get("overflow")]
    if overflowed:
        lines.append(
            "rows approximated beyond a step's capacity (DyLLM overflow), whole run: "
            + ", ".join(f"{r['method']} {r['overflow']}" for r in overflowed)
        )
    return "\n".join(lines)


def format_cost_table(bench: dict) -> str:
    """What each method computes: the active fraction of rows, denoising steps (NFE) per batch and
    the share of response tokens equal to vanilla's."""
    lines = ["| method | active fraction | NFE / batch | agreement with vanilla |", "|---|---|---|---|"]
    for r in bench["rows"]:
        lines.append(
            f"| {r['method']} | {r['active_fraction']:.3f} | {r['nfe']:.1f} | {100 * r['agreement']:.1f}% |"
        )
    return "\n".join(lines)


def format_task_table(bench: dict) -> str:
    """Exact match per method (rows) and task (columns), in whole percent; the counts behind each
    figure (and so its interval) are the rows' ``per_task`` in the JSON."""
    rows = bench["rows"]
    tasks = list(dict.fromkeys(t for r in rows for t in r.get("per_task", {})))
    lines = ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for r in rows:
        per_task = r.get("per_task", {})
        cells = [
            f"{100 * per_task[t]['correct'] / per_task[t]['n']:.0f}%" if per_task.get(t, {}).get("n") else ""
            for t in tasks
        ]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_tables(bench: dict) -> str:
    """The three tables of ``dyllm bench``, each within :data:`TABLE_WIDTH` columns."""
    return "\n\n".join((format_table(bench), format_cost_table(bench), format_task_table(bench)))


def bench_examples(
    n_per_task: int = DEFAULT_N_PER_TASK, tasks: tuple[str, ...] = tuple(TASKS), seed: int = 1234
) -> list[Example]:
    """Held-out prompts of the embedded models' task suite (never in their training split)."""
    return held_out_set(n_per_task, tasks, seed=seed)


def write_outputs(bench: dict, json_path: str | Path | None, plot_path: str | Path | None) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(bench, indent=2))
    if plot_path:
        from ..analysis.plots import plot_pareto

        plot_pareto(bench, plot_path, title="dyllm bench: speed vs accuracy")


__all__ = [
    "DEFAULT_N_PER_TASK",
    "DREAM_THRESHOLD_ALG",
    "Method",
    "MethodResult",
    "bench_examples",
    "default_methods",
    "TABLE_WIDTH",
    "format_cost_table",
    "format_table",
    "format_tables",
    "format_task_table",
    "run_bench",
    "sampler_params",
    "write_outputs",
]
