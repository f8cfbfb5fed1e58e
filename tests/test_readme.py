"""The README and the pages under docs/ cannot drift from the code: their Python examples compile
and run as written, every ``dyllm`` command line in them parses (and the cheap ones run on the
embedded model), every option their synopses and the README's CLI table name exists, and every
link between the pages lands on a file and a heading that exist.

A block that needs hardware, a checkpoint, a server or minutes of export carries the marker
``<!-- docs-test: parse only ... -->`` on the line before its fence (the reason follows it): its
Python is compiled and its commands are parsed, but nothing in it runs here.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from dyllm_fx.cli.main import build_parser, main
from dyllm_fx.errors import DyllmWarning
from dyllm_fx.eval.synthetic_tasks import ALPHABET, LETTERS
from dyllm_fx.loading import default_model_path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
TEXT = README.read_text()
README_FIRST_SCREEN_LINES = 250
PARSE_ONLY = "docs-test: parse only"
EMBEDDED = pytest.mark.skipif(
    not (default_model_path() / "config.json").is_file(), reason="embedded model not built"
)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int
    lang: str
    body: str
    parse_only: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def page_blocks(page: Path) -> list[Block]:
    """The fenced blocks of one page; a block is parse-only when the line before its fence
    carries the marker."""
    text = page.read_text()
    pattern = r"^(<!--[^\n]*-->\n)?```(\w*)\n(.*?)^```"
    return [
        Block(
            page,
            text.count("\n", 0, m.start(2)) + 1,
            m.group(2),
            m.group(3),
            bool(m.group(1)) and PARSE_ONLY in m.group(1),
        )
        for m in re.finditer(pattern, text, flags=re.S | re.M)
    ]


def code_blocks(lang: str, pages: list[Path] = PAGES) -> list[Block]:
    """The blocks of ``pages`` whose info string is ``lang`` ('' for none)."""
    return [b for page in pages for b in page_blocks(page) if b.lang == lang]


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


def _subcommands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(sub.choices)


def _is_synopsis(command: str) -> bool:
    return "[" in command or "..." in command


# (block, command) for every dyllm command of every bash block
ALL_COMMANDS = [(b, c) for b in code_blocks("bash") for c in shell_commands(b.body)]


def test_the_docs_have_commands_to_check():
    commands = [c for _, c in ALL_COMMANDS]
    assert any(c.startswith("dyllm generate ") for c in commands)
    assert any(c.startswith("dyllm eval ") for c in commands)
    assert any(b.page == README for b, c in ALL_COMMANDS if c.startswith("dyllm generate "))


@pytest.mark.parametrize("where, command", [(b.where, c) for b, c in ALL_COMMANDS if not _is_synopsis(c)])
def test_docs_command_parses(where, command):
    argv = shlex.split(command, comments=True)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{where}: command does not parse (exit {exit_.code}): {command}")


def _check_options(synopsis: str) -> None:
    """Every ``--option`` a synopsis names exists in the subcommand it names."""
    words = synopsis.split("#")[0].split()[1:]
    head = [w for w in words if re.fullmatch(r"[a-z]+", w)][:2]
    known = _options(head)
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", synopsis.split("#")[0]))
    missing = sorted(named - known)
    assert not missing, f"{synopsis!r} names options that `dyllm {' '.join(head)}` lacks: {missing}"


def _synopsis_lines() -> list[str]:
    """Synopsis commands: the plain blocks (continuation lines joined) and bash lines with
    optional [parts]."""
    lines = []
    for block in code_blocks(""):
        current = None
        for line in block.body.splitlines():
            if line.startswith("dyllm "):
                current = line
                lines.append(current)
            elif current is not None and line.startswith(" ") and line.strip().startswith("["):
                lines[-1] += " " + line.strip()
    return lines + [c for _, c in ALL_COMMANDS if _is_synopsis(c)]


@pytest.mark.parametrize("synopsis", _synopsis_lines())
def test_docs_synopsis_options_exist(synopsis):
    _check_options(synopsis)


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


def _readme_cli_table() -> list[str]:
    """The first cell's command of each row of the README's CLI table."""
    section = TEXT[TEXT.index("\n## CLI\n") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"^\| `([^`]+)`", section, flags=re.M)


def test_readme_cli_table_has_every_subcommand_and_real_options():
    rows = [r for r in _readme_cli_table() if r.startswith("dyllm ")]
    named = {r.split()[1] for r in rows}
    assert _subcommands() <= named, f"the README's CLI table lacks {sorted(_subcommands() - named)}"
    assert "--version" in named
    for row in rows:
        _check_options(row)


def test_readme_is_a_first_screen():
    lines = TEXT.count("\n")
    assert lines < README_FIRST_SCREEN_LINES, f"README.md has {lines} lines; move detail to docs/"


# --- python blocks --------------------------------------------------------------------------------


@pytest.mark.parametrize("block", code_blocks("python"), ids=lambda b: b.where)
def test_docs_python_block_compiles(block):
    compile(block.body, block.where, "exec")


def _is_api_example(block: Block) -> bool:
    return 'dyllm_fx.load("default")' in block.body and "transform(" in block.body


def test_readme_python_api_example_starts_with_its_imports():
    block = next(b for b in code_blocks("python", [README]) if _is_api_example(b))
    assert block.body.lstrip().startswith("import torch")


# A python block runs here on the embedded model unless its marker says why it cannot.
RUNNABLE_PYTHON = [b for b in code_blocks("python") if not b.parse_only]


def test_the_readme_api_example_is_run():
    assert any(b.page == README and _is_api_example(b) for b in RUNNABLE_PYTHON)


@pytest.mark.slow
@EMBEDDED
@pytest.mark.parametrize("block", RUNNABLE_PYTHON, ids=lambda b: b.where)
def test_docs_python_example_runs_as_written(block):
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DyllmWarning)  # no unknown characters, no empty answers
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(block.body, block.where, "exec"), namespace)
    if _is_api_example(block):
        out = namespace["out"]
        assert out.texts and all(t and set(t) <= set(ALPHABET) for t in out.texts)
        assert printed.getvalue().count("\n") >= 3  # its prints ran
        assert callable(namespace["compiled"])


# --- dyllm generate lines -------------------------------------------------------------------------


GENERATE_LINES = [
    (b.where, c)
    for b, c in ALL_COMMANDS
    if c.startswith("dyllm generate ") and not _is_synopsis(c) and not b.parse_only
]


@pytest.mark.slow
@EMBEDDED
@pytest.mark.parametrize("where, command", GENERATE_LINES)
def test_docs_generate_lines_run(where, command, capsys):
    argv = shlex.split(command, comments=True)[1:]
    prompts = build_parser().parse_args(argv).prompts
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == len(prompts) and all(line and set(line) <= set(ALPHABET) for line in lines), captured
    assert "warning" not in captured.err
    claimed = command.split("#", 1)[1].split() if "#" in command else []
    if len(claimed) == 1 and set(claimed[0]) <= set(ALPHABET):  # `dyllm generate ...   # its answer`
        assert lines == claimed, f"{where}: the page claims {claimed[0]}"


def test_readme_claims_the_right_answer():
    """The set-up's "# prints X" is the task's correct answer for the prompt it shows
    (computed as dyllm_fx.eval.synthetic_tasks does, not read from the model)."""
    match = re.search(r'dyllm generate "shift:([a-z]+)="\n\n# prints ([a-z]+)', TEXT)
    assert match, "the set-up example moved; update this test"
    letters, claimed = match.groups()
    assert claimed == "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in letters)


def test_readme_install_line_selects_the_cpu_wheels():
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in TEXT


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in ci and "python -m pytest -q -n 2 --dist loadfile tests" in ci
    assert "export TRITON_INTERPRET=1" in ci
    install = 'pip install torch==2.13.0 && pip install -e ".[test]"'
    assert f"{install} && TRITON_INTERPRET=1 python -m pytest -q -n 2 --dist loadfile tests" in TEXT


def test_docs_dream_threshold_commands_name_maskgit_plus():
    page = next(p.read_text() for p in PAGES if "* **Dream:**" in p.read_text())
    dream = page[page.index("* **Dream:**") :][:600]
    assert "--threshold 0.9 --alg maskgit_plus" in dream
    parse = build_parser().parse_args(
        shlex.split(
            re.search(r"`(dyllm eval \$COMMON [^`]*maskgit_plus[^`]*)`", dream)
            .group(1)
            .replace("$COMMON", "--model default")
        )[1:]
    )
    assert parse.alg == "maskgit_plus" and parse.threshold == 0.9


# --- links ----------------------------------------------------------------------------------------


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings (code blocks left out)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


LINKS = [
    (page, target)
    for page in PAGES
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    if not re.match(r"^[a-z]+://", target)
]


@pytest.mark.parametrize("page, target", LINKS, ids=[f"{p.relative_to(ROOT)}->{t}" for p, t in LINKS])
def test_docs_links_land(page, target):
    path, _, anchor = target.partition("#")
    landing = (page.parent / path).resolve() if path else page
    assert landing.is_file(), f"{page.name} links to {target}, which does not exist"
    if anchor:
        assert anchor in _anchors(landing), f"{page.name} links to {target}: no such heading"


def test_readme_links_every_docs_page():
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in TEXT, f"the README does not link docs/{page.name}"
