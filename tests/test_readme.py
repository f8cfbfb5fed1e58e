"""The README cannot drift from the code: its Python API example runs as written, every
``dyllm`` command line in it parses (and the cheap ones run on the embedded model), and every
option its synopses name exists.

Blocks that need hardware or files the test machine lacks (the ONNX / TensorRT example, the
8B evaluation commands) are parsed, not run.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import warnings
from pathlib import Path

import pytest

from dyllm_fx.cli.main import build_parser, main
from dyllm_fx.errors import DyllmWarning
from dyllm_fx.eval.synthetic_tasks import ALPHABET, LETTERS
from dyllm_fx.loading import default_model_path

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()
EMBEDDED = pytest.mark.skipif(
    not (default_model_path() / "config.json").is_file(), reason="embedded model not built"
)


def code_blocks(lang: str) -> list[str]:
    """The bodies of the README's fenced blocks whose info string is ``lang`` ('' for none)."""
    return [
        m.group(2)
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", TEXT, flags=re.S | re.M)
        if m.group(1) == lang
    ]


def shell_commands(block: str) -> list[str]:
    """The ``dyllm ...`` commands of a bash block: continuation lines joined, comments dropped,
    ``NAME=value`` assignments of the block expanded, ``a && b`` split."""
    joined = re.sub(r"\\\n\s*", " ", block)
    env: dict[str, str] = {}
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assign = re.match(r"^([A-Z_]+)=(.*)$", line)
        if assign:
            env[assign.group(1)] = " ".join(shlex.split(assign.group(2), comments=True))
            continue
        line = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), line)
        for part in line.split("&&"):
            part = part.strip()
            if part.startswith("dyllm "):
                commands.append(part)
    return commands


def _options(argv: list[str]) -> set[str]:
    """The option strings of the (sub)parser an argv selects."""
    parser = build_parser()
    for word in argv:
        sub = next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)
        if sub is None or word not in sub.choices:
            break
        parser = sub.choices[word]
    return {s for a in parser._actions for s in a.option_strings}


def _is_synopsis(command: str) -> bool:
    return "[" in command or "..." in command


ALL_COMMANDS = [c for block in code_blocks("bash") for c in shell_commands(block)]


def test_the_readme_has_commands_to_check():
    assert any(c.startswith("dyllm generate ") for c in ALL_COMMANDS)
    assert any(c.startswith("dyllm eval ") for c in ALL_COMMANDS)


@pytest.mark.parametrize("command", [c for c in ALL_COMMANDS if not _is_synopsis(c)])
def test_readme_command_parses(command):
    argv = shlex.split(command, comments=True)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"README command does not parse (exit {exit_.code}): {command}")


def _synopsis_lines() -> list[str]:
    """Synopsis commands: the plain block of the CLI section (continuation lines joined) and
    bash lines with optional [parts]."""
    lines = []
    for block in code_blocks(""):
        current = None
        for line in block.splitlines():
            if line.startswith("dyllm "):
                current = line
                lines.append(current)
            elif current is not None and line.startswith(" ") and line.strip().startswith("["):
                lines[-1] += " " + line.strip()
    return lines + [c for c in ALL_COMMANDS if _is_synopsis(c)]


@pytest.mark.parametrize("synopsis", _synopsis_lines())
def test_readme_synopsis_options_exist(synopsis):
    words = synopsis.split("#")[0].split()[1:]
    head = [w for w in words if re.fullmatch(r"[a-z]+", w)][:2]
    known = _options(head)
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", synopsis.split("#")[0]))
    missing = sorted(named - known)
    assert not missing, f"{synopsis!r} names options that `dyllm {' '.join(head)}` lacks: {missing}"


def test_cli_synopsis_lists_the_generate_options():
    synopsis = next(s for s in _synopsis_lines() if s.startswith("dyllm generate "))
    for option in (
        "--policy",
        "--policy-arg",
        "--compile",
        "--dtype",
        "--device",
        "--threads",
        "--json",
        "--onnx",
    ):
        assert option in synopsis


@pytest.mark.slow
@EMBEDDED
def test_readme_python_api_example_runs_as_written():
    block = next(b for b in code_blocks("python") if 'dyllm_fx.load("default")' in b and "transform(" in b)
    assert block.lstrip().startswith("import torch")
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DyllmWarning)  # no unknown characters, no empty answers
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(block, str(README), "exec"), namespace)
    out = namespace["out"]
    assert out.texts and all(t and set(t) <= set(ALPHABET) for t in out.texts)
    assert printed.getvalue().count("\n") >= 3  # its prints ran
    assert callable(namespace["compiled"])


@pytest.mark.slow
@EMBEDDED
@pytest.mark.parametrize(
    "command", [c for c in ALL_COMMANDS if c.startswith("dyllm generate ") and not _is_synopsis(c)]
)
def test_readme_generate_lines_run(command, capsys):
    assert main(shlex.split(command)[1:]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1 and lines[0] and set(lines[0]) <= set(ALPHABET), captured
    assert "warning" not in captured.err


def test_readme_claims_the_right_answer():
    """The set-up's "# prints X" is the task's correct answer for the prompt it shows
    (computed as dyllm_fx.eval.synthetic_tasks does, not read from the model)."""
    match = re.search(r'dyllm generate "shift:([a-z]+)="\n\n# prints ([a-z]+)', TEXT)
    assert match, "the set-up example moved; update this test"
    letters, claimed = match.groups()
    assert claimed == "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in letters)


def test_readme_install_line_selects_the_cpu_wheels():
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in TEXT


def test_readme_dream_threshold_commands_name_maskgit_plus():
    dream = TEXT[TEXT.index("* **Dream:**") :][:600]
    assert "--threshold 0.9 --alg maskgit_plus" in dream
    parse = build_parser().parse_args(
        shlex.split(
            re.search(r"`(dyllm eval \$COMMON [^`]*maskgit_plus[^`]*)`", dream)
            .group(1)
            .replace("$COMMON", "--model default")
        )[1:]
    )
    assert parse.alg == "maskgit_plus" and parse.threshold == 0.9
