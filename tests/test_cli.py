"""The `dyllm` command line, on a tiny checkpoint and on the embedded model."""

import json

import pytest

from dyllm_fx.cli import main
from dyllm_fx.loading import default_model_path


def test_info_reports_sizes(tiny_llada_dir, capsys):
    assert main(["info", str(tiny_llada_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llada" and info["layers"] == 2 and info["hidden_size"] == 32
    assert info["parameters"] > 0 and info["weight_files"] == ["model.safetensors"]


def test_info_dream(tiny_dream_dir, capsys):
    assert main(["info", str(tiny_dream_dir)]) == 0
    out = capsys.readouterr().out
    assert "dream" in out and "logits_shift" in out


def test_generate_prints_one_line_per_prompt(tiny_llada_dir, capsys):
    rc = main(["generate", "rev:abc=", "kv:a1?a=", "--model", str(tiny_llada_dir), "--gen-length", "8",
               "--block-length", "4", "--stats"])
    assert rc == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert "nfe=" in captured.err


def test_bad_input_is_one_clear_line(tiny_llada_dir, capsys):
    assert main(["generate", "x", "--model", str(tiny_llada_dir), "--gen-length", "8", "--block-length", "3"]) == 2
    err = capsys.readouterr().err
    assert "block_length=3 must divide gen_length=8" in err and "Traceback" not in err
    assert main(["info", "/no/such/folder"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not (default_model_path() / "config.json").is_file(), reason="embedded model not built")
def test_embedded_model_answers_a_task(capsys):
    from dyllm_fx.tasks import held_out_set

    ex = next(e for e in held_out_set(3, tasks=("shift",)))
    assert main(["generate", ex.prompt]) == 0
    assert capsys.readouterr().out.strip() == ex.answer
