"""The `dyllm` command line, on a tiny checkpoint and on the embedded model."""

import json

import pytest

from dyllm_fx.cli.main import main
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
    rc = main(
        [
            "generate",
            "rev:abc=",
            "kv:a1?a=",
            "--model",
            str(tiny_llada_dir),
            "--gen-length",
            "8",
            "--block-length",
            "4",
            "--stats",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert "nfe=" in captured.err


def test_bad_input_is_one_clear_line(tiny_llada_dir, capsys):
    assert (
        main(["generate", "x", "--model", str(tiny_llada_dir), "--gen-length", "8", "--block-length", "3"])
        == 2
    )
    err = capsys.readouterr().err
    assert "block_length=3 must divide gen_length=8" in err and "Traceback" not in err
    assert main(["info", "/no/such/folder"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not (default_model_path() / "config.json").is_file(), reason="embedded model not built")
def test_embedded_model_answers_a_task(capsys):
    from dyllm_fx.eval.synthetic_tasks import held_out_set

    ex = next(e for e in held_out_set(3, tasks=("shift",)))
    assert main(["generate", ex.prompt]) == 0
    assert capsys.readouterr().out.strip() == ex.answer


@pytest.mark.skipif(not (default_model_path() / "config.json").is_file(), reason="embedded model not built")
def test_readme_set_up_command_prints_what_the_readme_says(capsys):
    """The first lines of the README: `dyllm generate "shift:..."` and the line it prints."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"&& (dyllm generate [^\n]+)", readme).group(1)
    expected = re.search(r"# prints (\S+)", readme).group(1)
    prompt = shlex.split(command)[2]
    shifted = "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in prompt.split(":", 1)[1].rstrip("="))
    assert expected == shifted  # the README states the right answer...
    assert main(shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out.strip() == expected  # ...and the embedded model prints it
