"""Row-selection policies for the sparse step, by name, and their composition.

A *block-level* cache policy (Fast-dLLM ``prefix_cache`` / ``dual_cache``) composes with one
*row-level* policy (``dyllm``, ``es_dllm``, ``dllm_cache``): the block policy fixes which rows
may run at all (the row policy's ``scope``), the row policy picks among them. Threshold
parallel decoding is a sampler option (``generate(threshold=...)``) and combines with any of
them.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import (
    FULL,
    HostState,
    LayerResult,
    Plan,
    Policy,
    StepInputs,
    StepOutput,
    StepReport,
    full_step,
    head_logits,
    rows_step,
)
from .block_cache import DualCachePolicy, PrefixCachePolicy
from .dense import DensePolicy
from .dllm_cache import DLLMCachePolicy
from .dyllm import DyLLMPolicy
from .es_dllm import ESDLLMPolicy
from .fixed import FixedPolicy
from .keys import FullKey, PlanKey, RefreshKey
from .params import check_params
from .presets import family_of, preset
from .uniform import UniformPolicy

POLICIES: dict[str, type[Policy]] = {
    "dense": DensePolicy,
    "fixed": FixedPolicy,
    "prefix_cache": PrefixCachePolicy,
    "dual_cache": DualCachePolicy,
    "dyllm": DyLLMPolicy,
    "es_dllm": ESDLLMPolicy,
    "dllm_cache": DLLMCachePolicy,
}

# Block-level policies and the scope they give a row-level policy composed with them.
BLOCK_SCOPES = {"dual_cache": "block", "prefix_cache": "suffix"}
ROW_POLICIES = ("dyllm", "es_dllm", "dllm_cache")


def _build(name: str, config: dict, family: str | None) -> Policy:
    if name not in POLICIES:
        raise ValueError(
            f"unknown policy {name!r}; available: {sorted(POLICIES)} (compose as 'dual_cache+dyllm')"
        )
    check_params(POLICIES[name], name, config)  # names and types of the parameters, before building
    config = {**preset(name, family), **config}
    check_params(POLICIES[name], name, config)  # names and types of the parameters, before building
    try:
        return POLICIES[name](**config)
    except TypeError as err:
        raise ValueError(f"bad parameters for policy {name!r}: {err}") from err


def _compose(names: Sequence[str], config: dict, family: str | None) -> Policy:
    blocks = [n for n in names if n in BLOCK_SCOPES]
    rows = [n for n in names if n not in BLOCK_SCOPES]
    if len(blocks) != 1 or len(rows) != 1 or rows[0] not in ROW_POLICIES:
        raise ValueError(
            f"cannot compose {list(names)}: combine one block cache {sorted(BLOCK_SCOPES)} with one row "
            "policy "
            f"{list(ROW_POLICIES)}, e.g. ['dual_cache', 'dyllm']"
        )
    if "scope" in config:
        raise ValueError(
            f"'scope' is set by the block cache ({blocks[0]} -> {BLOCK_SCOPES[blocks[0]]!r}); drop it"
        )
    policy = _build(rows[0], {**config, "scope": BLOCK_SCOPES[blocks[0]]}, family)
    policy.name = f"{blocks[0]}+{rows[0]}"
    return policy


def policy_names(policy: str | Sequence[str]) -> list[str]:
    """The policy names of a name, a composition string ("a+b") or a list of names."""
    return policy.split("+") if isinstance(policy, str) else list(policy)


def make_policy(policy: str | Sequence[str] | Policy, family: str | None = None, **config) -> Policy:
    """A policy object from a name (and its parameters), a composition (``["dual_cache",
    "dyllm"]`` or ``"dual_cache+dyllm"``), or an object passed through. ``family`` ("llada",
    "dream") fills in the per-model presets (``presets.py``) for parameters not given."""
    if isinstance(policy, Policy):
        if config:
            raise ValueError(
                f"policy parameters {sorted(config)} given with a policy object; set them on the object"
            )
        return policy
    if not isinstance(policy, str) and not (
        isinstance(policy, Sequence) and policy and all(isinstance(n, str) for n in policy)
    ):
        raise TypeError(
            f"policy must be a name ({', '.join(POLICIES)}), a composition such as 'dual_cache+dyllm', or "
            f"a Policy object; got {type(policy).__name__} {policy!r}"[:300]
            + ". policy='dense' runs the model as it is"
        )
    names = policy_names(policy)
    if len(names) == 1:
        return _build(names[0], config, family)
    return _compose(names, config, family)


__all__ = [
    "BLOCK_SCOPES",
    "DLLMCachePolicy",
    "DensePolicy",
    "DualCachePolicy",
    "DyLLMPolicy",
    "ESDLLMPolicy",
    "FULL",
    "FixedPolicy",
    "FullKey",
    "HostState",
    "LayerResult",
    "POLICIES",
    "Plan",
    "PlanKey",
    "Policy",
    "PrefixCachePolicy",
    "ROW_POLICIES",
    "RefreshKey",
    "StepInputs",
    "StepOutput",
    "StepReport",
    "UniformPolicy",
    "family_of",
    "full_step",
    "head_logits",
    "make_policy",
    "policy_names",
    "preset",
    "rows_step",
]
