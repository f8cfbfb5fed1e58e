"""What an exported step graph records about itself, so that it can run without the model.

Stored as ONNX ``metadata_props`` (string -> string), every key prefixed ``dyllm.``: the
format version, the diffusion spec (mask / EOS / pad ids, logit shift, window), the policy and
its parameters, the cache layout (layer count, hidden size, K/V shapes, dtypes) and the model
folder whose tokenizer decodes the output (``"default"`` for the embedded model).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dyllm_fx.loading import embedded_model_name
from dyllm_fx.models.spec import DiffusionSpec
from dyllm_fx.runtime.policies import FixedPolicy, Policy

FORMAT = "dyllm-step/2"  # 2: a row policy's graphs serve branches of plan keys (size inputs)
PREFIX = "dyllm."
PLAN_KEYS = ("graph", "plans", "branches", "state", "params", "layout")  # the extra keys of a "plans" graph
REQUIRED = (
    "format",
    "mask_token_id",
    "eos_token_ids",
    "logits_shift",
    "policy",
    "policy_config",
    "n_layers",
    "hidden_size",
    "kv_shapes",
    "hidden_dtype",
    "kv_dtype",
    "inputs",
    "outputs",
)


class NotAStepGraphError(ValueError):
    """An ONNX file that is not a dyllm step graph (or not an ONNX file at all)."""


def policy_config(policy: Policy) -> dict:
    """The parameters that rebuild ``policy`` with ``make_policy(policy.name, **config)``: the
    constructor's parameters, read back from the object (a composition's ``scope`` is the
    block cache's, so it is left out)."""
    if isinstance(policy, FixedPolicy):
        return {"rows": policy.index.tolist()}
    config = {}
    for name in inspect.signature(type(policy).__init__).parameters:
        if name == "self" or (name == "scope" and "+" in policy.name):
            continue
        value = _read_param(policy, name)
        if value is not _MISSING:
            config[name] = _jsonable(value)
    return config


_MISSING = object()


def _read_param(policy: Policy, name: str):
    """The value constructor parameter ``name`` of ``policy`` was given (as the policy stores it)."""
    explicit = getattr(policy, "explicit", None)
    if name in ("skip_layers", "keep") and hasattr(policy, "explicit"):  # ES-dLLM's explicit layout
        if explicit is None:
            return None
        return [layer for layer, _ in explicit] if name == "skip_layers" else [keep for _, keep in explicit]
    clock = getattr(policy, name.replace("_interval", "_clock"), None)
    if name.endswith("_interval") and clock is not None and hasattr(clock, "interval"):  # dLLM-Cache's clocks
        return clock.interval
    return getattr(policy, name, _MISSING)


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def model_path_label(model_path: str | Path | None) -> str:
    """The name of an embedded model (``"default"``, ``"default-dream"``), else the folder as
    an absolute path ('' if unknown)."""
    if model_path is None:
        return ""
    name = embedded_model_name(model_path)
    if name is not None:
        return name
    return str(Path(model_path).expanduser().resolve())


@dataclass(frozen=True)
class StepGraphInfo:
    """The metadata of one exported step graph."""

    spec: DiffusionSpec
    policy: str
    policy_config: dict
    n_layers: int
    hidden_size: int
    kv_shapes: list[tuple[tuple[int, int], tuple[int, int]]]  # per layer: (KV heads, d) of K and of V
    hidden_dtype: str  # torch dtype name, e.g. "float32"
    kv_dtype: str
    inputs: list[str]
    outputs: list[str]
    model_path: str = ""
    extra: dict = field(default_factory=dict)
    # "rows": one graph, the layer-uniform step on a host-chosen row set; "plans": a row
    # policy's step, one branch per kind of step (``onnx_plans``)
    graph: str = "rows"
    # per graph key: {"key", "branch": the plan input that runs it, "min_seq", "max_seq"}
    plans: list = field(default_factory=list)
    # per branch (plan input): {"key": branch key, "counts": n, "eligible": bool, "min_seq", "max_seq"}
    branches: list = field(default_factory=list)
    state: list = field(default_factory=list)  # StateEntry.to_json() of each state tensor, in input order
    params: dict = field(
        default_factory=dict
    )  # policy parameters that are graph inputs, and their export values
    layout: dict = field(default_factory=dict)  # the generation layout the plan keys were listed for

    def to_props(self) -> dict[str, str]:
        s = self.spec
        props = {
            "format": FORMAT,
            "mask_token_id": str(s.mask_token_id),
            "eos_token_ids": json.dumps(list(s.eos_token_ids)),
            "pad_token_id": "" if s.pad_token_id is None else str(s.pad_token_id),
            "logits_shift": str(s.logits_shift),
            "max_length": "" if s.max_length is None else str(s.max_length),
            "policy": self.policy,
            "policy_config": json.dumps(self.policy_config),
            "n_layers": str(self.n_layers),
            "hidden_size": str(self.hidden_size),
            "kv_shapes": json.dumps(self.kv_shapes),
            "hidden_dtype": self.hidden_dtype,
            "kv_dtype": self.kv_dtype,
            "inputs": json.dumps(self.inputs),
            "outputs": json.dumps(self.outputs),
            "model_path": self.model_path,
            **{k: str(v) for k, v in self.extra.items()},
        }
        if self.graph != "rows":
            props.update(
                graph=self.graph,
                plans=json.dumps(self.plans),
                branches=json.dumps(self.branches),
                state=json.dumps(self.state),
                params=json.dumps(self.params),
                layout=json.dumps(self.layout),
            )
        return {PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str) -> "StepGraphInfo":
        """Parse ``metadata_props``; raises :class:`NotAStepGraphError` naming what is missing."""
        missing = [PREFIX + k for k in REQUIRED if PREFIX + k not in props]
        if missing:
            raise NotAStepGraphError(
                f"{source} is not a dyllm step graph (missing metadata {', '.join(missing)}); "
                "export one with `dyllm export --onnx`"
            )
        p = {k[len(PREFIX) :]: v for k, v in props.items() if k.startswith(PREFIX)}
        if p["format"] != FORMAT:
            raise NotAStepGraphError(
                f"{source} is a dyllm step graph of format {p['format']!r}; this dyllm-fx reads {FORMAT!r}. "
                "Export it again with `dyllm export --onnx`"
            )

        def read(key: str, parse, optional: bool = False):
            """p[key] parsed; a bad value raises an error naming the file, the key and the value."""
            if optional and not p.get(key):
                return None
            try:
                return parse(p[key])
            except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
                raise NotAStepGraphError(
                    f"{source}: malformed metadata {PREFIX}{key} = {p[key]!r} ({err}); "
                    "export it again with `dyllm export --onnx`"
                ) from err

        spec = DiffusionSpec(
            mask_token_id=read("mask_token_id", int),
            eos_token_ids=tuple(read("eos_token_ids", json.loads)),
            pad_token_id=read("pad_token_id", int, optional=True),
            logits_shift=read("logits_shift", int),
            max_length=read("max_length", int, optional=True),
        )
        known = set(REQUIRED) | {"pad_token_id", "max_length", "model_path", *PLAN_KEYS}
        graph = p.get("graph", "rows")
        if graph not in ("rows", "plans"):
            raise NotAStepGraphError(
                f"{source}: unknown step graph kind {PREFIX}graph = {graph!r}; export it again with `dyllm "
                "export --onnx`"
            )
        plan_fields = {}
        if graph == "plans":
            missing = [PREFIX + k for k in PLAN_KEYS if k not in p]
            if missing:
                raise NotAStepGraphError(
                    f"{source}: a plan step graph without {', '.join(missing)}; export it again with `dyllm "
                    "export --onnx`"
                )
            plan_fields = {k: read(k, json.loads) for k in PLAN_KEYS if k != "graph"}
        return cls(
            spec=spec,
            policy=p["policy"],
            policy_config=read("policy_config", json.loads),
            n_layers=read("n_layers", int),
            hidden_size=read("hidden_size", int),
            kv_shapes=[tuple(tuple(s) for s in layer) for layer in read("kv_shapes", json.loads)],
            hidden_dtype=p["hidden_dtype"],
            kv_dtype=p["kv_dtype"],
            inputs=read("inputs", json.loads),
            outputs=read("outputs", json.loads),
            model_path=p.get("model_path", ""),
            extra={k: v for k, v in p.items() if k not in known},
            graph=graph,
            **plan_fields,
        )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def step_graph_info(model, model_path: str | Path | None = None, **plan_fields) -> StepGraphInfo:
    """The metadata of ``model`` (a TransformedModel)'s step: the layer-uniform graph, or with
    ``plan_fields`` (graph="plans", inputs, outputs, plans, branches, state, params, layout) a row
    policy's plan graphs."""
    from .step_module import input_names, output_names

    program = model.program
    n_layers = len(program.attn)
    fields_ = {"inputs": input_names(n_layers), "outputs": output_names(n_layers), **plan_fields}
    return StepGraphInfo(
        spec=model.diffusion,
        policy=model.policy.name,
        policy_config=policy_config(model.policy),
        n_layers=n_layers,
        hidden_size=program.hidden_size,
        kv_shapes=[tuple(tuple(s) for s in layer) for layer in program.kv_shapes],
        hidden_dtype=dtype_name(program.hidden_dtype),
        kv_dtype=dtype_name(program.kv_dtype),
        model_path=model_path_label(model_path),
        **fields_,
    )


__all__ = [
    "FORMAT",
    "NotAStepGraphError",
    "StepGraphInfo",
    "dtype_name",
    "model_path_label",
    "policy_config",
    "step_graph_info",
]
