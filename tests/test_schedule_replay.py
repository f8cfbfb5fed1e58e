"""benchmarks/schedule_replay.py: real schedules recorded and replayed on another model, with
the replayed plan equal to the recorded one."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_replayed_plans_equal_the_recorded_ones(tmp_path, monkeypatch):
    bench = _script("schedule_replay")
    replay = sys.modules["replay"]
    compared = []
    drifted = replay.drifted

    def checked(schedule, records):
        problems = drifted(schedule, records)
        assert [r.kind for r in records] == [s.key.kind for s in schedule.steps]
        assert [r.active for r in records] == [s.active for s in schedule.steps]
        compared.append((schedule.method, problems, any(s.cosine is not None for s in schedule.steps)))
        return problems

    monkeypatch.setattr(bench, "drifted", checked)
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    assert bench.main(["--smoke", "--json", str(out_json), "--markdown", str(out_md)]) == 0
    assert compared and all(problems == [] for _, problems, _ in compared)
    # DyLLM's salient rows came from recorded cosines: its replay read them
    assert any(forced for method, _, forced in compared if method.startswith("dual_cache+dyllm"))
    result = json.loads(out_json.read_text())
    labels = {r["method"] for r in result["rows"]}
    assert {"vanilla", "dual_cache", "dyllm", "dual_cache+dyllm", "dual_cache + threshold 0.9"} <= labels
    assert {t["target"] for t in result["targets"]} == {t.name for t in bench.TARGETS}
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    # the recorded cosines and inputs make every policy choose the recorded plans by itself
    assert all(r["plans_forced"] == 0 for r in result["rows"])
    assert "| DyLLM target |" in out_md.read_text()


def test_drift_is_reported():
    replay = _script("replay")
    model_steps = replay.Schedule("m", "dual_cache", {}, None, None, gen_length=4)
    model_steps.steps.append(
        replay.RecordedStep((torch.zeros(1, 4),), (), {}, "key", "key", False, [4, 4], None)
    )

    class Record:
        key, active, extra = "key", [4, 3], {}

    assert replay.drifted(model_steps, [Record()]) and replay.drifted(model_steps, [])
    assert replay.drifted(model_steps, [type("R", (), {"key": "key", "active": [4, 4], "extra": {}})()]) == []
