from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Lets test modules `from tiny_checkpoints import ...` whatever the rootdir / import mode.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import tiny_checkpoints  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny shapes: extra intra-op threads only spin, and on a busy machine they make every
    step wait for a free core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_llada_dir(tmp_path: Path) -> Path:
    """A single-file tiny LLaDA-like checkpoint folder (config.json, model.safetensors, tokenizer)."""
    return tiny_checkpoints.write_tiny_llada(tmp_path / "tiny-llada")


@pytest.fixture
def tiny_dream_dir(tmp_path: Path) -> Path:
    """A single-file tiny Dream-like checkpoint folder (config.json, model.safetensors, tokenizer)."""
    return tiny_checkpoints.write_tiny_dream(tmp_path / "tiny-dream")


@pytest.fixture
def tiny_tokenizer():
    return tiny_checkpoints.tiny_tokenizer()
