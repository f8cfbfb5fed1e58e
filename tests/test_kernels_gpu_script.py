"""benchmarks/kernels_gpu.py runs end to end: its --smoke path (tiny shapes, CPU tensors, the
Triton kernels through the interpreter) checks every kernel and times every benchmark without a
GPU, so the script the GPU run depends on cannot rot unnoticed.

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
SCRIPT = ROOT / "benchmarks" / "kernels_gpu.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the smoke run needs triton (interpreter)")
def test_kernels_gpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--all", "--smoke", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "### Correctness" in proc.stdout and "### Timings" in proc.stdout

    report = json.loads(out.read_text())
    assert report["errors"] == []
    bad = [c for c in report["cases"] if c["status"] not in ("pass", "skipped")]
    assert not bad, bad
    sections = {c["section"] for c in report["cases"]}
    assert sections == {"cache_scatter", "partial_attn", "saliency", "approx_attn", "gathered_mlp", "ops"}
    # Only the CUDA-registration rows may be skipped on a CPU.
    assert all("CUDA kernel registered" in c["case"] for c in report["cases"] if c["status"] == "skipped")
    benches = {t["bench"] for t in report["timings"]}
    assert benches == {"partial_attention", "approx_attention", "saliency", "cache_scatter", "gathered_mlp"}
    assert all(not t["errors"] and t["ms"] for t in report["timings"])
    # The kernels came from this checkout, without the package's heavy __init__.
    assert Path(report["env"]["kernels_dir"]) == ROOT / "kernels"
    assert report["env"]["transformers_imported"] is False
