"""Calls go one way: front doors -> the API -> model adapters and the runtime -> passes, kernels
and model definitions. Walks every module's imports (module level and inside functions alike)
and fails on an import circle or on an import from a lower layer into a higher one.

It also checks the tree imports cleanly from the repository root, where a top-level folder
named like a real package (``kernels``, which transformers imports) would shadow it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dyllm_fx"

# Module-name prefixes and their layer, most specific first. A module may import its own layer
# and the layers below, never a higher one.
LAYERS = (
    ("dyllm_fx.cli", 6),
    ("dyllm_fx.serving", 5),
    ("dyllm_fx.export", 5),
    ("dyllm_fx.eval", 5),
    ("dyllm_fx.analysis", 5),
    ("dyllm_fx.transform", 4),
    ("dyllm_fx.generation", 4),
    ("dyllm_fx.backend", 4),
    ("dyllm_fx.loading", 4),
    ("dyllm_fx.options", 4),
    ("dyllm_fx.policy_setup", 4),
    ("dyllm_fx.adapters", 3),
    # public as dyllm_fx.explain(), and what TransformedModel.explain() (adapters) calls: it reads
    # the runtime's program and engine only
    ("dyllm_fx.explain", 3),
    ("dyllm_fx.runtime", 2),
    ("dyllm_fx.passes", 1),
    ("dyllm_fx.kernels", 0),
    ("dyllm_fx.models", 0),
    ("dyllm_fx.errors", 0),
    ("dyllm_fx.values", 0),
    # the tensor-parallel process group and its collectives: used by the sharding pass and the
    # runtime's per-row reductions
    ("dyllm_fx.distributed", 0),
    # reductions over a vocabulary split across those ranks: the sampler's and the policies'
    ("dyllm_fx.vocab_parallel", 0),
    ("dyllm_fx.char_tokenizer", 0),
    ("dyllm_fx.prompts", 0),
    ("dyllm_fx.assets", 0),
)
# The package's __init__ re-exports the public API: the top, with the CLI that uses it.
TOP = 6


def layer_of(module: str) -> int:
    if module == "dyllm_fx":
        return TOP
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} has no layer in tests/test_import_layers.py: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def known_module(name: str, modules: set[str]) -> str | None:
    """The longest prefix of ``name`` that is one of the project's modules."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: Path, modules: set[str]) -> set[str]:
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = known_module(name, modules)
            if target is not None and target != me:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def test_no_import_from_a_lower_layer_into_a_higher_one():
    wrong = [
        f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, targets in import_graph().items()
        for dst in sorted(targets)
        if layer_of(dst) > layer_of(src)
    ]
    assert not wrong, "imports that run back up:\n" + "\n".join(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    # A package's __init__ re-exporting its submodules, and a submodule importing from its own
    # package, are how Python packages load, not circles between modules.
    graph = {
        src: {d for d in dsts if not (src.startswith(d + ".") or d.startswith(src + "."))}
        for src, dsts in import_graph().items()
    }
    circle = _cycle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_walker_sees_a_circle_and_an_upward_import():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("dyllm_fx.models.llada") < layer_of("dyllm_fx.transform")


def test_no_top_level_package_shadows_a_dependency():
    shadowing = [name for name in ("kernels", "passes", "runtime") if (ROOT / name).exists()]
    assert not shadowing, f"top-level folders {shadowing} shadow installed packages; keep them in dyllm_fx/"


def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers")
    code = (
        "import transformers, dyllm_fx\n"
        "getattr(transformers, 'DiffusionGemmaForBlockDiffusion', None)\n"
        "import dyllm_fx.kernels, dyllm_fx.passes, dyllm_fx.runtime\n"
        "print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
