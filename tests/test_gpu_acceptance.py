"""benchmarks/gpu_acceptance.py: the prepared GPU acceptance command. Its ``--smoke`` mode runs
the same stages on the CPU at tiny shapes, so the command cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _acceptance():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "benchmarks" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def acceptance():
    return _acceptance()


@pytest.mark.slow  # about 20 s of CPU: a pytest run, two traces, 24 generations, 32 timed steps
def test_smoke_runs_every_stage_and_writes_the_report(acceptance, tmp_path, capsys):
    assert acceptance.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "smoke.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == list(acceptance.STAGES) and report["smoke"]
    tests = stages["cuda_tests"]  # tests/test_cuda_graph_step.py: skipped without a GPU
    assert (
        tests["status"] == ("passed" if torch.cuda.is_available() else "skipped")
        and tests["details"]["counts"]
    )
    assert stages["graphs"]["status"] == "passed"
    checked = {c["policy"] for c in stages["graphs"]["details"]["checks"]}
    assert checked == set(acceptance.acceptance_policies()) and {"dyllm", "dual_cache+dyllm"} <= checked
    timing = stages["timing"]["details"]
    assert stages["timing"]["status"] == "passed" and timing["bandwidth_gbs"] > 0
    groups = {(g["decoding"].split(":")[0], g["batch"]) for g in timing["groups"]}
    assert groups == {(d, b) for d in ("one token a step", "threshold") for b in (1, 8)}
    labels = [r["case"] for r in timing["groups"][0]["rows"]]
    assert labels[:2] == ["dense", "dual_cache"] and acceptance.COMPOSED in labels
    assert [t["batch"] for t in timing["targets"]] == [1, 8, 1, 8]
    assert stages["replay"]["status"] in ("passed", "missing")
    page = (tmp_path / "smoke.md").read_text()
    assert "| stage | status | seconds | detail |" in page and "x weight-read bound" in page
    assert page in capsys.readouterr().out


def test_the_replay_stage_reports_a_missing_or_script_script(acceptance, tmp_path):
    sh, clock = acceptance.shapes(True), acceptance.Clock(1.0)
    missing = acceptance.run_replay(sh, clock, tmp_path, script=tmp_path / "absent.py")
    assert missing.status == "missing" and "absent.py" in missing.why
    script = tmp_path / "schedule_replay.py"
    script.write_text("import sys\nsys.exit('no replay here')\n")
    failed = acceptance.run_replay(sh, clock, tmp_path, script=script)
    assert (
        failed.status == "failed"
        and "no replay here" in failed.why
        and "--smoke" in failed.details["command"]
    )
    script.write_text(  # the contract: --markdown PATH / --json PATH get the tables
        "import sys\nfrom pathlib import Path\nargs = sys.argv\n"
        "Path(args[args.index('--markdown') + 1]).write_text('| method | tokens/s |')\n"
    )
    passed = acceptance.run_replay(sh, clock, tmp_path, script=script)
    assert (
        passed.status == "passed" and Path(passed.details["markdown"]).read_text() == "| method | tokens/s |"
    )


def test_a_failed_stage_makes_the_exit_code_nonzero(acceptance, tmp_path, monkeypatch):
    monkeypatch.setattr(acceptance, "run_replay", lambda *a: acceptance.Stage("replay", "failed", "crashed"))
    assert acceptance.main(["--smoke", "--stages", "replay", "--out", str(tmp_path)]) == 1
    stages = json.loads((tmp_path / "smoke.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["skipped", "skipped", "skipped", "failed"]


def test_targets_are_met_or_not_and_the_dense_step_has_no_bound_target(acceptance):
    batch1 = [
        {"case": "dense", "x_bound": 9.0},
        {"case": "dual_cache", "x_bound": 1.2},
        {"case": "dyllm 10%", "x_bound": 1.7},
    ]
    batch8 = [
        {"case": "dual_cache", "vs_dual_cache": 1.0},
        {"case": acceptance.COMPOSED, "vs_dual_cache": 1.6},
    ]
    out = acceptance.targets(
        [{"decoding": "d", "batch": 1, "rows": batch1}, {"decoding": "d", "batch": 8, "rows": batch8}]
    )
    assert [t["met"] for t in out] == [False, True]
    assert "not met (dyllm 10%)" in out[0]["line"] and "1.70x" in out[0]["line"]
    batch1[2]["x_bound"] = 1.5
    assert acceptance.targets([{"decoding": "d", "batch": 1, "rows": batch1}])[0]["met"]


def test_pytest_summary_counts(acceptance):
    counts = acceptance.pytest_counts(
        "....\nSKIPPED [2] t.py:3: no GPU\n3 passed, 2 skipped, 1 deselected in 1.2s\n"
    )
    assert counts == {"passed": 3, "skipped": 2, "deselected": 1}


def test_the_documented_commands_parse(acceptance):
    """docs/results.md's command lines name only options the script has."""
    page = (ROOT / "docs" / "results.md").read_text()
    lines = re.findall(
        r"^(?:python benchmarks/gpu_acceptance\.py|benchmarks/gpu_acceptance\.sh)(.*?)(?:#.*)?$", page, re.M
    )
    assert len(lines) >= 3 and any("--smoke" in line for line in lines)
    for line in lines:
        acceptance.build_parser().parse_args(shlex.split(line))


def test_a_stage_command_is_killed_at_its_budget(acceptance):
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    code, output = acceptance.stream(sleeper, 1.0, acceptance.Clock(1.0), "test")
    assert code is None and output == "started\n"
