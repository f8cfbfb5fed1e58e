"""dyllm bench (dyllm_fx/eval/methods_bench.py, benchmarks/methods.py) and the GPU step benchmark's CPU smoke
path: the table's bookkeeping, not its timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dyllm_fx
from dyllm_fx.cli.main import main
from dyllm_fx.eval.methods_bench import Method, bench_examples, format_table, run_bench

# Slow (`-m "not slow"` leaves it out): runs `dyllm bench` on the embedded models.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GEN = dict(gen_length=32, block_length=16, steps=32)


@pytest.fixture(scope="module")
def bench():
    model, tok = dyllm_fx.load("default")
    methods = [
        Method("vanilla", "vanilla"),
        Method("dense", "dense"),
        Method("dual_cache+dyllm", "dual_cache+dyllm", {"tau": 0.95}),
        Method("dual_cache + threshold", "dual_cache", threshold=0.9),
    ]
    return run_bench(model, tok, bench_examples(2, ("shift",)), methods, batch_size=2, progress=False, **GEN)


def test_rows_are_measured_against_vanilla(bench):
    rows = {r["method"]: r for r in bench["rows"]}
    assert list(rows) == ["vanilla", "dense", "dual_cache+dyllm", "dual_cache + threshold"]
    assert rows["vanilla"]["speedup"] == 1.0 and rows["vanilla"]["agreement"] == 1.0
    assert (
        rows["dense"]["agreement"] == 1.0 and rows["dense"]["active_fraction"] == 1.0
    )  # dense equals vanilla
    assert rows["dense"]["accuracy"] == rows["vanilla"]["accuracy"]
    assert rows["dual_cache+dyllm"]["active_fraction"] < 0.5
    assert rows["dual_cache + threshold"]["nfe"] < 32  # several tokens per step
    for r in bench["rows"]:
        assert r["tokens_per_s"] > 0 and r["speedup"] == pytest.approx(
            r["tokens_per_s"] / rows["vanilla"]["tokens_per_s"]
        )
    assert bench["settings"]["examples"] == 2


def test_rows_carry_intervals_and_the_paired_comparison(bench):
    from dyllm_fx.eval.significance import mcnemar_exact, wilson_interval

    rows = {r["method"]: r for r in bench["rows"]}
    for r in bench["rows"]:
        assert r["n"] == 2 and r["correct"] == round(r["accuracy"] * 2)
        assert (r["accuracy_low"], r["accuracy_high"]) == wilson_interval(r["correct"], 2)
        assert r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"]
        assert r["mcnemar_p"] == mcnemar_exact(r["won"], r["lost"])
        # won - lost is exactly the difference in correct prompts against vanilla
        assert r["won"] - r["lost"] == r["correct"] - rows["vanilla"]["correct"]
        assert r["per_task"] == {"shift": {"correct": r["correct"], "n": 2}}
    assert (rows["vanilla"]["won"], rows["vanilla"]["lost"], rows["vanilla"]["mcnemar_p"]) == (0, 0, 1.0)
    assert (rows["dense"]["won"], rows["dense"]["lost"]) == (0, 0)
    from dyllm_fx.eval.methods_bench import format_task_table

    table = format_task_table(bench)
    assert table.splitlines()[0] == "| method | shift |" and "| dense | " in table


def test_defaults_score_at_least_400_prompts():
    from dyllm_fx.cli.main import build_parser
    from dyllm_fx.eval.jsonl_tasks import suite_examples
    from dyllm_fx.eval.methods_bench import bench_examples
    from dyllm_fx.eval.synthetic_tasks import TASKS

    args = build_parser().parse_args(["bench"])
    examples = bench_examples(args.n, tuple(args.tasks.split(",")))
    assert len(examples) >= 400 and len({e.task for e in examples}) == len(TASKS)
    assert len(suite_examples()) >= 400  # dyllm eval --task suite


def test_dream_threshold_rows_use_a_probability_confidence(tiny_dream_dir):
    from dyllm_fx.eval.methods_bench import DREAM_THRESHOLD_ALG, sampler_params

    dream, _ = dyllm_fx.load(tiny_dream_dir)
    llada, _ = dyllm_fx.load("default")
    plain, fast = Method("vanilla", "vanilla"), Method("vanilla + threshold", "vanilla", threshold=0.9)
    assert sampler_params(dream, fast) == {"alg": DREAM_THRESHOLD_ALG} and sampler_params(dream, plain) == {}
    assert sampler_params(llada, fast) == {}  # LLaDA's low-confidence sampler takes a threshold as it is


@pytest.mark.skipif(
    not (dyllm_fx.default_model_path("default-dream") / "config.json").is_file(),
    reason="embedded Dream model not built",
)
def test_cli_bench_on_the_embedded_dream_model(tmp_path, capsys):
    out = tmp_path / "dream.json"
    code = main(
        [
            "bench",
            "--model",
            "default-dream",
            "--n",
            "1",
            "--tasks",
            "shift,add",
            "--methods",
            "vanilla + threshold,dual_cache",
            "--gen-length",
            "32",
            "--block-length",
            "16",
            "--batch-size",
            "2",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    bench = json.loads(out.read_text())
    assert [r["method"] for r in bench["rows"]] == ["vanilla", "vanilla + threshold", "dual_cache"]
    assert bench["settings"]["threshold_alg"] == "maskgit_plus" and bench["rows"][1]["nfe"] < 32


def test_table_and_plot_input(bench, tmp_path):
    table = format_table(bench)
    footnote = any(r["overflow"] for r in bench["rows"])  # the overflow line, when a row overflowed
    assert table.count("\n") == 1 + len(bench["rows"]) + footnote and "| vanilla | " in table
    assert ("DyLLM overflow" in table) == footnote
    from dyllm_fx.analysis.plots import validate_bench

    validate_bench(json.loads(json.dumps(bench)))  # what `dyllm plot pareto` reads


def test_first_method_must_be_vanilla():
    model, tok = dyllm_fx.load("default")
    with pytest.raises(ValueError, match="first method must be plain vanilla"):
        run_bench(model, tok, bench_examples(1, ("shift",)), [Method("dense", "dense")], progress=False)


def test_repeats_time_round_robin_and_keep_the_decisions():
    model, tok = dyllm_fx.load("default")
    methods = [Method("vanilla", "vanilla"), Method("dual_cache+dyllm", "dual_cache+dyllm", {"tau": 0.95})]
    examples = bench_examples(1, ("shift",))
    once = run_bench(model, tok, examples, methods, batch_size=1, progress=False, **GEN)
    twice = run_bench(model, tok, examples, methods, batch_size=1, progress=False, repeats=2, **GEN)
    assert twice["settings"]["repeats"] == 2
    for a, b in zip(once["rows"], twice["rows"]):  # the same decoding, only the timing differs
        assert (a["accuracy"], a["agreement"], a["nfe"]) == (b["accuracy"], b["agreement"], b["nfe"])
    with pytest.raises(ValueError, match="repeats"):
        run_bench(model, tok, examples, methods, progress=False, repeats=0)


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--n",
            "1",
            "--tasks",
            "shift",
            "--methods",
            "dual_cache",
            "--gen-length",
            "32",
            "--block-length",
            "16",
            "--batch-size",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    assert [r["method"] for r in json.loads(out.read_text())["rows"]] == ["vanilla", "dual_cache"]
    printed = capsys.readouterr().out
    assert (
        "| dual_cache |" in printed
        and "| method | accuracy [95% CI] | won / lost vs vanilla | McNemar p |" in printed
    )
    assert main(["bench", "--methods", "nope"]) == 2  # one clear line, exit code 2


def test_step_gpu_benchmark_smoke_runs_on_cpu():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "step_gpu.py"),
            "--smoke",
            "--methods",
            "rows 10,dyllm 10",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| vanilla |" in proc.stdout and "| dyllm 10% |" in proc.stdout


def test_generate_gpu_benchmark_smoke_runs_on_cpu():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "generate_gpu.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| dual_cache (CUDA graphs) |" in proc.stdout


def test_cpu_ops_benchmark_prints_every_variant():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_ops.py"), "--iters", "1", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "us per call" not in line]
    assert len(rows) == 8 and "| approx_attention mode 2: lean CPU path |" in proc.stdout


def test_step_sparsity_benchmark_smoke_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "step_sparsity.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--threads", "1"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for case in ("vanilla (eager)", "dual_cache (eager)", "dyllm 25% (eager)", "es_dllm keep 25% (eager)"):
        assert f"| {case} |" in done.stdout


def test_compiled_rows_sit_beside_the_eager_ones_and_the_plain_loop_agrees():
    """``compile`` adds a compiled row for every transformed method (here through the fast
    aot_eager backend); the Fast-dLLM plain loop decodes the dual cache's tokens."""
    model, tok = dyllm_fx.load("default")
    methods = [
        Method("vanilla", "vanilla"),
        Method("dual_cache", "dual_cache"),
        Method("plain loop: dual cache", "fastdllm-loop:dual"),
    ]
    out = run_bench(
        model,
        tok,
        bench_examples(1, ("shift",)),
        methods,
        batch_size=1,
        progress=False,
        compile="aot_eager",
        gen_length=64,
        block_length=32,
        steps=64,
    )
    rows = {r["method"]: r for r in out["rows"]}
    assert list(rows) == ["vanilla", "dual_cache", "dual_cache [compiled]", "plain loop: dual cache"]
    assert (
        rows["dual_cache [compiled]"]["compiled"] and rows["dual_cache [compiled]"]["graphs"] >= 2
    )  # full + span
    assert rows["dual_cache [compiled]"]["agreement"] == rows["dual_cache"]["agreement"]
    assert rows["plain loop: dual cache"]["agreement"] == rows["dual_cache"]["agreement"]
    assert "inductor graphs per method: dual_cache" in format_table(out)


def test_default_methods_start_with_the_official_defaults():
    from dyllm_fx.eval.methods_bench import default_methods

    methods = {m.label: m for m in default_methods()}
    assert methods["dyllm"].params == {} and methods["es_dllm"].params == {}  # the authors' settings
    variants = [label for label in methods if label.startswith(("dyllm:", "es_dllm:"))]
    assert len(variants) >= 5 and all("," not in label for label in methods)  # --methods splits on commas


def _benchmark(name: str):
    """The module of ``benchmarks/<name>.py`` (benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# a benchmark's smallest run: DyLLM alone, eager, two prompts, one timed pass
SMOKE = ("--methods", "dyllm", "--eager", "--batch", "2", "--n", "1", "--repeats", "1")


def _run_benchmark(name: str, *args: str):
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_step_kinds_groups_steps_by_kind_and_counts_capacities():
    from types import SimpleNamespace

    from dyllm_fx.runtime.policies import FullKey
    from dyllm_fx.runtime.policies.dyllm import SparseKey

    step_kinds = _benchmark("step_kinds")
    keys = [
        FullKey(),
        SparseKey(64, 32, "exact", False, 8),
        SparseKey(64, 64, "exact", False, 64),
        SparseKey(90, 32, "exact", False, None),
        SparseKey(64, 16, "exact", False, None),  # a per-sequence MLP selection
    ]
    out = SimpleNamespace(stats=SimpleNamespace(step_seconds=[0.4, 0.1, 0.3, 0.2, 0.0]))
    lines = step_kinds.report("dyllm", out, keys)
    assert lines[0] == "| dyllm | full | - | 1 | 400.0 | 40% | - |"
    assert lines[1] == "| dyllm | sparse | 64 | 3 | 133.3 | 40% | 16: 1, 32/8: 1, 64/64: 1 |"
    assert lines[2] == "| dyllm | sparse | 90 | 1 | 200.0 | 20% | 32: 1 |"
    assert lines[3] == "| dyllm | all | | 5 | 200.0 | 100% | |"
    # the flat rows key: one selection of B * m rows per layer, m its capacity and MLP capacity
    assert step_kinds.capacity_label(SparseKey(32, 4, "exact", False, 4, flat=True)) == "4 flat"
    assert step_kinds.capacity_label(SparseKey(32, 32, "exact", False, 8)) == "32/8"


def test_step_kinds_benchmark_smoke_runs():
    done = _run_benchmark("step_kinds", *SMOKE)
    assert done.returncode == 0, done.stderr[-2000:]
    for selection in ("batch", "sequence"):  # both MLP row selections, side by side
        label = f"| dyllm ({selection} MLP rows) |"
        assert f"{label} full |" in done.stdout and f"{label} sparse |" in done.stdout


def test_dyllm_floor_configurations_and_agreement():
    floor = _benchmark("dyllm_floor")
    composed = dict(floor.configurations("dual_cache+dyllm"))
    assert composed["official defaults"] == {} and composed["floor: capacity 1"] == {"capacity": 1}
    assert composed["flat rows"] == {"mlp_selection": "batch", "kv_selection": "batch"}
    alone = dict(floor.configurations("dyllm"))
    assert alone["floor: capacity 1, cached softmax stats, frozen prompt"]["full_query_interval"] is None
    a = torch.tensor([[5, 5, 1, 2, 3, 4]])
    b = torch.tensor([[6, 6, 1, 2, 0, 0]])
    assert floor.agreement(a, b, 4) == 0.5  # the prompt columns do not count


def test_dyllm_floor_refuses_a_method_without_dyllm():
    done = _run_benchmark("dyllm_floor", "--methods", "dual_cache")
    assert done.returncode == 2 and "takes DyLLM policies" in done.stderr and "Traceback" not in done.stderr


def test_dyllm_floor_benchmark_smoke_runs():
    done = _run_benchmark("dyllm_floor", *SMOKE)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| dual_cache | - |" in done.stdout and "| dyllm | floor: capacity 1 |" in done.stdout
    assert "| dyllm | official defaults |" in done.stdout and done.stdout.count("100.0%") >= 1
