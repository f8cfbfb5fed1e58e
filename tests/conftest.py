"""Fixtures shared by the test modules. The helper modules beside them (tiny_checkpoints,
policy_helpers, the references) are importable because pyproject.toml puts tests/ on pytest's
``pythonpath``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import policy_helpers
import tiny_checkpoints


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


@pytest.fixture(scope="module")
def models():
    """The 4-layer LLaDA and Dream of :func:`policy_helpers.tiny_models` (read-only)."""
    return policy_helpers.tiny_models()


@pytest.fixture(scope="module")
def programs():
    """Their transformed programs, traced once per process (:func:`policy_helpers.tiny_programs`)."""
    return policy_helpers.tiny_programs()
