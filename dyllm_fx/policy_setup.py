"""A model for a policy name: ``vanilla`` (untransformed) or ``transform(model, policy=...)``.

Shared by ``dyllm eval``, ``dyllm plot`` and the lm-eval adapter, which all take a policy
name plus ``key=value`` parameters from a command line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:  # torch is imported only when a model is built (the CLI's --help stays fast)
    from torch import nn

VANILLA = "vanilla"
# The policy names and compositions, spelled out so the command line's help needs no torch;
# tests/test_front_door.py checks them against dyllm_fx.runtime.policies.
POLICY_NAMES = ("dense", "fixed", "prefix_cache", "dual_cache", "dyllm", "es_dllm", "dllm_cache")
COMPOSITIONS = tuple(
    f"{b}+{r}" for b in ("dual_cache", "prefix_cache") for r in ("dyllm", "es_dllm", "dllm_cache")
)


def policy_help(default: str) -> str:
    return (
        f"'vanilla' (the untransformed model), a transform() policy ({', '.join(POLICY_NAMES)}) or a block "
        "cache "
        f"composed with a row policy, e.g. dual_cache+dyllm (default {default})"
    )


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
            raise UsageError(f"policy argument {pair!r} is not key=value; write e.g. --policy-arg tau=0.99")
        params[key.strip().replace("-", "_")] = parse_value(value.strip())
    return params


def check_policy(policy: str, params: Mapping | None = None, compile: bool = False) -> None:
    """Fail early (before any weights load, before a reference run) on an unknown policy name or
    composition, parameters it does not take or of the wrong type or range, or vanilla with
    arguments: the policy object is built once here and thrown away (cheap)."""
    if policy == VANILLA:
        if params or compile:
            raise UsageError(
                "policy 'vanilla' is the untransformed model and takes no policy arguments or --compile"
            )
        return
    from .runtime.policies import make_policy

    try:
        make_policy(policy, **dict(params or {}))
    except ValueError as err:
        if str(err).startswith("unknown policy"):
            raise UsageError(f"{err}; or {VANILLA!r} for the untransformed model") from None
        raise


def apply_policy(
    model: "nn.Module", policy: str, params: Mapping | None = None, compile: bool = False
) -> "nn.Module":
    """``model`` itself for ``vanilla``, else ``dyllm_fx.transform(model, policy, **params)``."""
    from .transform import transform

    params = dict(params or {})
    if policy == VANILLA:
        check_policy(policy, params, compile)
        return model
    return transform(model, policy=policy, compile=compile, **params)


def records_of(model: "nn.Module") -> list | None:
    """The sparse engine's StepRecords of the last generation, or None (vanilla model)."""
    engine = getattr(model, "engine", None)
    return None if engine is None else list(engine.records)
