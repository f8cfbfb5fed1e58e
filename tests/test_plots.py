"""Saliency heatmap and speed-accuracy plot: PNGs from Python and from `dyllm plot`."""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib", reason='plots need the optional extra: pip install "dyllm-fx[plot]"')

import dyllm_fx  # noqa: E402
from dyllm_fx.analysis.plots import (  # noqa: E402
    load_bench,
    pareto_front,
    plot_pareto,
    plot_ratios,
    plot_saliency,
)
from dyllm_fx.analysis.saliency_trace import record_saliency, trace_from_records  # noqa: E402
from dyllm_fx.cli.main import main  # noqa: E402
from dyllm_fx.runtime.engine import StepRecord  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BENCH = {
    "device": "cpu (test)",
    "rows": [
        {
            "method": "vanilla",
            "accuracy": 0.6,
            "tokens_per_s": 10.0,
            "speedup": 1.0,
            "active_fraction": 1.0,
            "nfe": 256,
        },
        {
            "method": "dual_cache",
            "accuracy": 0.58,
            "tokens_per_s": 40.0,
            "speedup": 4.0,
            "active_fraction": 0.2,
            "nfe": 256,
        },
        {
            "method": "slow_and_bad",
            "accuracy": 0.3,
            "tokens_per_s": 5.0,
            "speedup": 0.5,
            "active_fraction": 0.9,
            "nfe": 256,
        },
    ],
}


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_pareto_png_and_front(tmp_path):
    bench_file = tmp_path / "bench.json"
    bench_file.write_text(json.dumps(BENCH))
    _assert_png(plot_pareto(bench_file, tmp_path / "pareto.png"))
    _assert_png(plot_pareto(BENCH, tmp_path / "speedup.png", x="speedup"))
    assert pareto_front([(10, 0.6), (40, 0.58), (5, 0.3)]) == [0, 1]


def test_ratio_bars_png(tmp_path):
    groups = {"model a, batch 1": {"x": 1.5, "y": 0.5}, "model a, batch 8": {"x": 2.0}}
    _assert_png(plot_ratios(groups, tmp_path / "ratios.png", "against the dual cache"))
    with pytest.raises(ValueError, match="at least one group"):
        plot_ratios({}, tmp_path / "none.png")


def test_bench_errors_name_the_row_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"rows": [{"method": "x", "accuracy": 1.0, "tokens_per_s": 1.0}, {"method": "y"}]})
    )
    with pytest.raises(ValueError, match="row 1 lacks accuracy, tokens_per_s"):
        load_bench(bad)
    with pytest.raises(FileNotFoundError, match="benchmarks/methods.py"):
        load_bench(tmp_path / "missing.json")


def test_saliency_from_records_with_similarity(tmp_path):
    seq, layers = 12, 3
    records = []
    for step in range(4):
        sim = [torch.full((1, seq), math.nan) for _ in range(layers)]
        sim[1][0, 6:] = torch.linspace(0.98, 1.0, seq - 6)
        records.append(
            StepRecord(
                active=[seq if step == 0 else 4] * layers,
                seq_len=seq,
                similarity=sim if step else [None] * layers,
            )
        )
    trace = trace_from_records(records, layer=1, prompt_length=6, policy="fake")
    assert trace.active_fraction.shape == (4, 3) and trace.similarity.shape == (4, seq)
    assert math.isnan(trace.similarity[0, 0]) and trace.similarity[1, -1] == pytest.approx(1.0)
    _assert_png(plot_saliency(trace, tmp_path / "fake.png"))
    with pytest.raises(ValueError, match="layer 5 out of range"):
        trace_from_records(records, layer=5, prompt_length=6, policy="fake")


@pytest.mark.slow
def test_record_saliency_on_the_embedded_model(tmp_path):
    model, tok = dyllm_fx.load("default")
    prompt = "shift:helloworldthisisdyllmfxdemoabcd="
    trace = record_saliency(
        model, tok, prompt, policy="dual_cache", gen_length=32, block_length=16, layer=2, stop_at_eos=False
    )
    plen = len(prompt)
    # one column per layer of the model (32 steps of the 32-token window)
    assert (
        trace.active_fraction.shape == (32, len(model.layers)) and trace.similarity is None
    )  # dual_cache measures none
    assert (
        trace.active_fraction[0].min() == 1.0 and trace.active_fraction[1].max() < 1.0
    )  # refresh, then the block
    assert trace.active_rows[1, plen : plen + 16].min() == 1.0 and trace.active_rows[1, :plen].max() == 0.0
    _assert_png(plot_saliency(trace, tmp_path / "sal.png"))
    with pytest.raises(ValueError, match="nothing to plot"):
        record_saliency(model, tok, prompt, policy="vanilla")


@pytest.mark.slow
def test_record_saliency_with_dyllm_measures_similarity(tmp_path):
    from dyllm_fx.runtime.policies import POLICIES

    if "dyllm" not in POLICIES:
        pytest.skip("the dyllm policy is not registered in this checkout")
    model, tok = dyllm_fx.load("default")
    prompt = "shift:helloworldthisisdyllmfxdemoabcd="
    trace = record_saliency(
        model, tok, prompt, policy="dyllm", gen_length=32, block_length=16, stop_at_eos=False
    )
    plen = len(prompt)
    assert trace.similarity is not None and trace.similarity.shape == (32, plen + 32)
    assert np.isnan(trace.similarity[:4]).all()  # the official 4 dense steps measure nothing
    assert math.isnan(trace.similarity[4, 0]) and not math.isnan(trace.similarity[4, -1])  # response only
    assert not np.isnan(trace.similarity[7]).any()  # every 4th step queries the whole sequence
    warm = trace.active_rows[4]
    assert warm[:plen].max() == 0.0 and warm[plen:].min() >= 0.5  # the response span is queried
    _assert_png(plot_saliency(trace, tmp_path / "dyllm.png"))


@pytest.mark.slow
def test_plot_cli(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(BENCH))
    assert main(["plot", "pareto", str(bench), "--out", str(tmp_path / "p.png")]) == 0
    _assert_png(tmp_path / "p.png")
    assert (
        main(
            [
                "plot",
                "saliency",
                "--prompt",
                "rev:abcdefghijklmnop=",
                "--out",
                str(tmp_path / "s.png"),
                "--gen-length",
                "32",
                "--block-length",
                "16",
                "--layer",
                "5",
            ]
        )
        == 0
    )
    _assert_png(tmp_path / "s.png")
    assert main(["plot", "pareto", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no benchmark JSON at" in err and "nope.json" in err and "dyllm bench --json" in err


def test_pareto_numbers_stay_below_the_title(tmp_path, monkeypatch):
    """Many methods at the top accuracy stack their numbers upward: none may overlap the title."""
    import dyllm_fx.analysis.plots as plots

    drawn = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, out: (drawn.append(fig), real_save(fig, out))[1])
    rows = [
        {"method": f"m{i}", "accuracy": 1.0, "tokens_per_s": 10.0 + i, "speedup": 1.0, "nfe": 64}
        for i in range(8)
    ]
    rows.append({"method": "low", "accuracy": 0.2, "tokens_per_s": 12.0, "speedup": 1.0, "nfe": 64})
    plot_pareto({"rows": rows, "device": "cpu"}, tmp_path / "p.png")
    (fig,) = drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    ax = fig.axes[0]
    title = ax.title.get_window_extent(renderer)
    numbers = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(numbers) == len(rows)
    assert all(box.y1 <= title.y0 for box in numbers), (title, max(box.y1 for box in numbers))
