"""An export a user can wait for (dyllm_fx/export/progress.py, noise.py): the output path is
refused before any tracing, a progress bar over the plan keys (off with progress=False /
--quiet), the length warning before the work, and no third-party warning noise.

The refusals and the warning need no export; one tiny layer-uniform export (a 1-layer LLaDA)
checks the bar and the silenced noise on the real exporter.
"""

from __future__ import annotations

import logging
import warnings

import pytest

from tiny_checkpoints import tiny_llada

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import dyllm_fx  # noqa: E402
from dyllm_fx.cli.main import main  # noqa: E402
from dyllm_fx.errors import DyllmWarning, UsageError  # noqa: E402
from dyllm_fx.export import onnx_plans, to_onnx  # noqa: E402
from dyllm_fx.export.noise import quiet_exporters  # noqa: E402
from dyllm_fx.export.progress import graph_bar, warn_length  # noqa: E402
from dyllm_fx.values import check_output_path  # noqa: E402

LAYOUT = dict(gen_length=16, block_length=8, max_seq=40)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llada(seed=3, n_layers=1)


@pytest.fixture
def no_tracing(monkeypatch):
    """Fail the test if anything reaches torch's exporter."""
    import torch

    def traced(*args, **kwargs):
        raise AssertionError("the export traced before refusing its output path")

    monkeypatch.setattr(torch.onnx, "export", traced)
    monkeypatch.setattr(onnx_plans, "export_branch", traced)


@pytest.mark.parametrize("policy", ["dense", "dyllm"])
def test_to_onnx_refuses_a_folder_before_tracing(tiny, tmp_path, no_tracing, policy):
    fast = dyllm_fx.transform(tiny, policy=policy)
    layout = LAYOUT if policy == "dyllm" else {}
    with pytest.raises(UsageError, match="is a folder; give a file name inside it"):
        to_onnx(fast, tmp_path, progress=False, **layout)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        to_onnx(fast, tmp_path / "file" / "step.onnx", progress=False, **layout)


def test_the_output_folder_is_created_before_the_work(tmp_path):
    out = check_output_path(tmp_path / "a" / "b" / "step.onnx", "--onnx")
    assert out.parent.is_dir() and not out.exists()


def test_cli_refuses_the_path_before_loading(tmp_path, monkeypatch, capsys):
    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded before the output path was checked")

    monkeypatch.setattr(dyllm_fx, "load", loaded)
    assert main(["export", "--onnx", str(tmp_path), "--policy", "dyllm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--onnx" in err and "is a folder" in err
    assert main(["export", "--onnx", str(tmp_path / "x.onnx"), "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_length_warning_comes_before_the_work():
    with pytest.warns(DyllmWarning, match=r"traces 3 step graphs .* min"):
        estimate = warn_length(3, 8, "dyllm")
    assert estimate > 60
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_length(1, 1, "dyllm")  # a short export says nothing


def test_progress_bar_off_and_on():
    assert graph_bar(3, False).disable
    assert not graph_bar(3, True).disable


def test_noise_filter_is_narrow(caplog):
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    with quiet_exporters(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # inside the filter's own context: its filters come first
        with quiet_exporters():
            registry.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
            registry.warning("something else")
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn("ours", DyllmWarning)
            warnings.warn("a user's own deprecation", DeprecationWarning)
    messages = [r.getMessage() for r in caplog.records]
    assert "something else" in messages and not any("torchvision" in m for m in messages)
    assert [str(w.message) for w in seen] == ["ours", "a user's own deprecation"]


def test_tiny_export_is_quiet_and_shows_progress(tiny, tmp_path, capfd, caplog):
    fast = dyllm_fx.transform(tiny, policy="dense")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # as a fresh interpreter shows each warning once
        to_onnx(fast, tmp_path / "on.onnx")
    assert [f"{w.category.__name__}: {w.message}" for w in seen] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    err = capfd.readouterr().err
    assert "export" in err and "1/1" in err  # the bar
    assert "torchvision" not in err and "Warning" not in err, err
    to_onnx(fast, tmp_path / "off.onnx", progress=False)
    assert capfd.readouterr().err == ""


def _canonical(path) -> str:
    """The model's text with the exporters' generated names (``val_12``, ``node_Concat_3``, per
    branch tag) numbered by first appearance: each process numbers its own graphs from zero."""
    import re

    import onnx

    names: dict[str, str] = {}
    pattern = r"(?:\bk[0-9]+/)?\b(?:val|node_[A-Za-z]+)_[0-9_]+\b"
    text = str(onnx.load(str(path)))
    return re.sub(pattern, lambda m: names.setdefault(m.group(0), f"#{len(names)}"), text)


def test_workers_write_the_same_graph(tiny, tmp_path):
    import onnx

    fast = dyllm_fx.transform(tiny, policy="dyllm")
    keys = [("full",), ("sparse", "L", "L", "exact", False, None, False)]
    one = to_onnx(fast, tmp_path / "one.onnx", keys=keys, progress=False, workers=1, **LAYOUT)
    two = to_onnx(fast, tmp_path / "two.onnx", keys=keys, progress=False, workers=2, **LAYOUT)
    ops = [n.op_type for n in onnx.load(str(two)).graph.node]
    assert ops.count("If") == 1 and "Equal" in ops  # the plan input picks one of the two branches
    assert _canonical(one) == _canonical(two)


def _pid_model(i: int):
    import os

    import onnx_ir as ir

    graph = ir.Graph([], [], nodes=[], name=f"pid{os.getpid()}")
    return ir.Model(graph, ir_version=10)


def test_run_forked_runs_in_other_processes():
    import os

    from dyllm_fx.export.workers import run_forked

    names = dict((i, m.graph.name) for i, m in run_forked(_pid_model, 4, 2))
    assert sorted(names) == [0, 1, 2, 3]
    assert f"pid{os.getpid()}" not in names.values()
    assert {m.graph.name for _, m in run_forked(_pid_model, 2, 1)} == {f"pid{os.getpid()}"}
