"""A model for a policy name: ``vanilla`` (untransformed) or ``transform(model, policy=...)``.

Shared by ``dyllm eval``, ``dyllm plot`` and the lm-eval adapter, which all take a policy
name plus ``key=value`` parameters from a command line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

VANILLA = "vanilla"


def parse_value(text: str):
    """A command-line value as Python: ints, floats, true/false/none, comma lists ("0,1,2")."""
    if "," in text:
        return [parse_value(part) for part in text.split(",") if part != ""]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_policy_args(pairs: Iterable[str] | None) -> dict:
    """``["tau=0.99", "rows=0,1,2"]`` -> ``{"tau": 0.99, "rows": [0, 1, 2]}``."""
    params = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"policy argument {pair!r} is not key=value; write e.g. --policy-arg tau=0.99")
        params[key.strip().replace("-", "_")] = parse_value(value.strip())
    return params


def check_policy(policy: str, params: Mapping | None = None, compile: bool = False) -> None:
    """Fail early (before any weights load) on an unknown policy name or vanilla with arguments."""
    from .runtime.policies import POLICIES

    if policy == VANILLA:
        if params or compile:
            raise ValueError("policy 'vanilla' is the untransformed model and takes no policy arguments or --compile")
    elif policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; available: {sorted([VANILLA, *POLICIES])}")


def apply_policy(model: nn.Module, policy: str, params: Mapping | None = None, compile: bool = False) -> nn.Module:
    """``model`` itself for ``vanilla``, else ``dyllm_fx.transform(model, policy, **params)``."""
    from .transform import transform

    params = dict(params or {})
    if policy == VANILLA:
        check_policy(policy, params, compile)
        return model
    return transform(model, policy=policy, compile=compile, **params)


def records_of(model: nn.Module) -> list | None:
    """The sparse engine's StepRecords of the last generation, or None (vanilla model)."""
    engine = getattr(model, "engine", None)
    return None if engine is None else list(engine.records)
