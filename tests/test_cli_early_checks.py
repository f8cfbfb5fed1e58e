"""A command-line mistake that needs no model is one line that names the fix, given before torch
is imported (dyllm_fx/cli/early_checks.py); the thread default; bench tables within 120 columns;
``generate --json`` fills its steps."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (command line, words of the message that name the fix); {file} is a regular file, {dir} a folder.
BAD_INPUTS = [
    (["generate", ""], "the prompt is empty; give the text"),
    (["generate", "12+7=", "  "], "prompt 2 is empty"),
    (["generate", "12+7=", "--steps", "0"], "e.g. steps=2"),
    (["generate", "12+7=", "--gen-length", "64", "--block-length", "5"], "e.g. use block_length=4"),
    (["generate", "12+7=", "--policy", "nope"], "unknown policy 'nope'; use 'vanilla'"),
    (["generate", "12+7=", "--policy", "dual_cache+nope"], "unknown policy 'nope'"),
    (["generate", "12+7=", "--policy", "dyllm", "--policy-arg", "tau"], "write e.g. --policy-arg tau=0.99"),
    (["generate", "12+7=", "--temperature", "nan"], "--temperature must be a finite number"),
    (["generate", "12+7=", "--temperature", "-1"], "--temperature must be at least 0"),
    (["generate", "12+7=", "--threshold", "inf"], "--threshold must be a finite number"),
    (["generate", "12+7=", "--threshold", "1.5"], "--threshold must be in (0, 1]"),
    (["generate", "12+7=", "--cfg-scale", "-0.5"], "--cfg-scale must be at least 0"),
    (["generate", "12+7=", "--threads", "0"], "--threads must be at least 1"),
    (["generate", "12+7=", "--compare"], "give one, e.g. --policy dual_cache"),
    (["generate", "12+7=", "--onnx", "{dir}/missing.onnx"], "write one with `dyllm export --onnx FILE`"),
    (["bench", "--n", "0"], "--n must be at least 1"),
    (["bench", "--repeats", "0"], "--repeats must be at least 1"),
    (["bench", "--tau", "nan"], "--tau must be a finite number"),
    (["bench", "--tasks", "shift,nope"], "unknown task(s) ['nope']; choose from"),
    (["bench", "--json", "{file}/out.json"], "is a file, not a folder; pick another path"),
    (["bench", "--plot", "{dir}"], "is a folder; give a file name inside it"),
    (["eval", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["eval", "--task", "{dir}/missing.jsonl"], "no such file; give a JSONL file or 'suite'"),
    (["eval", "--json", "{file}/out.json"], "is a file, not a folder"),
    (["plot", "saliency", "--prompt", " ", "--out", "{dir}/s.png"], "the prompt is empty"),
    (["plot", "saliency", "--prompt", "12+7=", "--out", "{file}/s.png"], "is a file, not a folder"),
    (["plot", "pareto", "{dir}/missing.json", "--out", "{dir}/p.png"], "write one with `dyllm bench --json"),
    (["serve", "--lifetime", "inf"], "--lifetime must be a finite number"),
    (["serve", "--max-queue-size", "0"], "--max-queue-size must be at least 1"),
    (["serve", "--port", "-1"], "--port must be in 0..65535"),
    (["serve", "--tensor-parallel-size", "0"], "--tensor-parallel-size must be at least 1"),
    (["serve", "--replicas", "2", "-tp", "2", "--gpus-per-replica", "1"], "give it --gpus-per-replica 2"),
]

# Runs every bad command line in one fresh interpreter and reports, for each, the exit status,
# stderr and whether torch (or transformers) was imported by then.
RUNNER = """
import contextlib, io, json, sys
from dyllm_fx.cli.main import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
    results.append({"rc": rc, "err": err.getvalue(), "heavy": heavy})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paths")
    (tmp / "a_file").write_text("x")
    argvs = [[a.format(file=tmp / "a_file", dir=tmp) for a in argv] for argv, _ in BAD_INPUTS]
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("index", range(len(BAD_INPUTS)), ids=[" ".join(a)[:40] for a, _ in BAD_INPUTS])
def test_mistake_is_one_line_naming_the_fix_before_torch(outcomes, index):
    argv, needle = BAD_INPUTS[index]
    out = outcomes[index]
    lines = [line for line in out["err"].splitlines() if line.strip()]
    assert out["rc"] == 2 and len(lines) == 1, out
    assert lines[0].startswith(f"dyllm {argv[0]}: error: ") and "internal error" not in lines[0]
    assert needle in lines[0], (needle, lines[0])
    assert out["heavy"] == [], f"{out['heavy']} imported before the mistake was reported"


def test_output_folders_are_created_up_front(tmp_path):
    from dyllm_fx.values import check_output_path

    path = tmp_path / "new" / "deeper" / "bench.json"
    assert check_output_path(path, "--json") == path
    assert path.parent.is_dir() and not path.exists()  # the folder now; the file when it is written


def test_a_permission_error_is_the_user_s_not_internal(monkeypatch, capsys):
    from dyllm_fx.cli import main as cli_main

    def refuse(args):
        raise PermissionError(13, "Permission denied", "/root/x.json")

    monkeypatch.setitem(cli_main.HANDLERS, "info", refuse)
    assert cli_main.main(["info"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "internal error" not in err


def test_small_models_default_to_one_thread():
    from dyllm_fx.cli.common_args import SMALL_MODEL_PARAMETERS, checkpoint_parameters, default_threads
    from dyllm_fx.loading import load, resolve_model_path

    model, _ = load("default")
    counted = checkpoint_parameters(resolve_model_path("default"))
    assert counted == sum(p.numel() for p in model.parameters())
    assert default_threads(counted) == 1
    assert default_threads(SMALL_MODEL_PARAMETERS) is None and default_threads(None) is None


def test_threads_follow_the_model_unless_given():
    import torch

    from dyllm_fx.cli.common_args import apply_threads
    from dyllm_fx.loading import resolve_model_path

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        args = argparse.Namespace(threads=None)
        apply_threads(args, resolve_model_path("default"))
        assert args.threads == 1 and torch.get_num_threads() == 1
        args = argparse.Namespace(threads=2)
        apply_threads(args, resolve_model_path("default"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_every_computing_command_takes_threads():
    from dyllm_fx.cli.main import build_parser

    parser = build_parser()
    for argv in (
        ["generate", "x"],
        ["bench"],
        ["eval"],
        ["serve"],
        ["plot", "saliency", "--prompt", "x", "--out", "x.png"],
    ):
        assert parser.parse_args([*argv, "--threads", "3"]).threads == 3, argv


def test_bench_tables_fit_120_columns():
    from dyllm_fx.eval.methods_bench import TABLE_WIDTH, default_methods, format_tables
    from dyllm_fx.eval.synthetic_tasks import TASKS

    labels = [m.label for m in default_methods()]
    labels += [label + " [compiled]" for label in labels]
    worst = {  # the widest figure each column can print
        "n": 400,
        "correct": 400,
        "accuracy": 1.0,
        "won": 400,
        "lost": 400,
        "mcnemar_p": 0.0625,
        "tokens_per_s": 12345.6,
        "speedup": 12.34,
        "active_fraction": 0.123,
        "nfe": 1024.0,
        "agreement": 1.0,
        "per_task": {t: {"correct": 60, "n": 60} for t in TASKS},
    }
    bench = {"rows": [{"method": label, **worst} for label in labels], "settings": {}}
    text = format_tables(bench)
    assert TABLE_WIDTH == 120 and text.count("\n| ") >= 3 * len(labels)
    too_wide = [line for line in text.splitlines() if len(line) > TABLE_WIDTH]
    assert not too_wide, too_wide[:2]


def test_generate_json_fills_steps(tiny_llada_dir, capsys):
    from dyllm_fx.cli.main import main

    argv = ["generate", "12", "--model", str(tiny_llada_dir), "--gen-length", "8", "--block-length", "4"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decoding"]["steps"] == 8 and report["stats"]["steps"] == 8
    assert main([*argv, "--steps", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decoding"]["steps"] == 4 and report["stats"]["steps"] == 4


def test_generate_compare_prints_both_sides_and_the_speedup(tiny_llada_dir, capsys):
    from dyllm_fx.cli.main import main

    argv = ["generate", "12", "--model", str(tiny_llada_dir), "--gen-length", "8", "--block-length", "8"]
    assert main([*argv, "--policy", "dense", "--compare"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0].startswith("vanilla ") and lines[1].startswith("dense ") and "nfe=8" in lines[1]
    assert "x vanilla's speed, the same text (fastest of 3 runs each)" in lines[2]  # dense: vanilla's tokens
    assert len(captured.out.splitlines()) == 1
