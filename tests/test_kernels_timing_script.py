"""benchmarks/kernels_timing.py runs end to end: its --smoke path (tiny shapes, CPU tensors, the
Triton kernels through the interpreter) times every benchmark without a GPU, so the script the
GPU run depends on cannot rot unnoticed. The kernels' correctness on a GPU is tests/test_kernels.py
under ``pytest -m cuda``.

It runs in a subprocess because TRITON_INTERPRET must be set before Triton is imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernels_timing.py"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="the smoke run needs triton (interpreter)"
)
def test_kernels_timing_smoke_runs_every_section(tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "### Timings" in proc.stdout

    report = json.loads(out.read_text())
    assert report["errors"] == []
    benches = {t["bench"] for t in report["timings"]}
    assert benches == {"partial_attention", "approx_attention", "cache_scatter", "gathered_mlp"}
    assert all(not t["errors"] and t["ms"] for t in report["timings"])
    # The installed package's kernels, imported without the model code.
    assert Path(report["env"]["kernels_dir"]).name == "kernels"
    assert report["env"]["transformers_imported"] is False
