"""Row-selection policies for the sparse step, by name."""

from __future__ import annotations

from .base import Policy, StepState
from .block_cache import DualCachePolicy, PrefixCachePolicy
from .dense import DensePolicy
from .fixed import FixedPolicy

POLICIES: dict[str, type[Policy]] = {
    "dense": DensePolicy,
    "fixed": FixedPolicy,
    "prefix_cache": PrefixCachePolicy,
    "dual_cache": DualCachePolicy,
}


def make_policy(policy: str | Policy, **config) -> Policy:
    """A policy object from a name (and its parameters) or an object passed through."""
    if isinstance(policy, Policy):
        if config:
            raise ValueError(f"policy parameters {sorted(config)} given with a policy object; set them on the object")
        return policy
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; available: {sorted(POLICIES)}")
    try:
        return POLICIES[policy](**config)
    except TypeError as err:
        raise ValueError(f"bad parameters for policy {policy!r}: {err}") from err


__all__ = [
    "POLICIES", "DensePolicy", "DualCachePolicy", "FixedPolicy", "Policy", "PrefixCachePolicy", "StepState", "make_policy",
]
