"""Helpers for the tests that run every policy (not a test module): building every registered
policy with parameters that keep every row, and cheap TransformedModels that share one traced
program. The ``models`` / ``programs`` fixtures over them live in conftest.py."""

from __future__ import annotations

import functools

import pytest

import dyllm_fx
from dyllm_fx.runtime import policies as _policies
from dyllm_fx.runtime.policies import POLICIES, Policy, make_policy
from dyllm_fx.transform import TransformedModel
from tiny_checkpoints import tiny_dream, tiny_llada

# Read when a test module is collected, so policies registered later are picked up.
NAMES = sorted(POLICIES)
# Every block cache composed with every row policy ("dual_cache+dyllm", ...), where the
# registry supports composition.
COMPOSED = sorted(
    f"{block}+{row}"
    for block in getattr(_policies, "BLOCK_SCOPES", {})
    for row in getattr(_policies, "ROW_POLICIES", ())
    if block in POLICIES and row in POLICIES
)


# The parameters with which a row policy recomputes every row it may (its keep-everything limit).
KEEP_ALL = {
    "dyllm": {"every_row": True},
    # no skip layer, and no delayed EOS (the official sampler rule that holds an EOS row back)
    "es_dllm": {"proportion_steps": ((1.0, 0.0),), "delay_eos": False},
    "dllm_cache": {"ratio": 1.0},
}


def policy_params(name: str) -> list[dict]:
    """Parameter sets to try for ``name``: the keep-everything set first when it has one (a
    composition takes its row policy's), then its defaults."""
    keep_all = KEEP_ALL.get(name.split("+")[-1], {})
    return [keep_all, {}] if keep_all else [{}]


def build_policy(name: str) -> Policy:
    """A fresh policy object, or a pytest skip when it cannot be built without rows."""
    if name == "fixed":
        pytest.skip("the fixed policy needs explicit rows (it recomputes a given set, not the response)")
    errors = []
    for params in policy_params(name):
        try:
            return make_policy(name, **params)
        except (TypeError, ValueError) as err:
            errors.append(f"{params}: {err}")
    pytest.skip(f"policy {name!r} cannot be built with defaults or keep-all parameters: {errors}")


def fresh(programs: dict, arch: str, policy: Policy) -> TransformedModel:
    """A new TransformedModel (own engine, cache and policy) over ``programs[arch]``'s program."""
    base = programs[arch]
    return TransformedModel(base.program, policy, base.diffusion)


@functools.cache
def tiny_models() -> dict:
    """A 4-layer LLaDA and Dream (room for ES-dLLM's default skip layers 1 and 3, and for
    saliency to propagate), built once per test process. Treat them as read-only."""
    # A head scaled by 3: larger logit gaps, no near-ties between runs that should agree.
    return {
        "llada": tiny_llada(seed=11, head_scale=3.0, n_layers=4),
        "dream": tiny_dream(seed=12, head_scale=3.0, num_hidden_layers=4),
    }


@functools.cache
def tiny_programs() -> dict:
    """``dyllm_fx.transform`` of each of :func:`tiny_models`, traced once per test process;
    use :func:`fresh` for a model with its own engine and policy."""
    return {arch: dyllm_fx.transform(m) for arch, m in tiny_models().items()}
