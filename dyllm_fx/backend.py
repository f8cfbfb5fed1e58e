"""The ``dyllm`` dynamo backend: ``torch.compile(model, backend="dyllm", options={...})``.

Dynamo hands over the graph of the model's forward; the backend runs the same passes as
``dyllm_fx.transform`` on it (capture -> find blocks -> split into row pieces -> rewrite
attention), compiles each piece with inductor, and returns a callable with the graph's
signature whose calls go through the cache-backed sparse step.

Options:
    policy: policy name or object (default "dense"); other keys are the policy's parameters.
    compile_pieces: compile each piece with inductor (default True).
    mask_token_id: lets the step tell a new generation from the next step of the current one;
        without it every call recomputes all rows (correct, but nothing is reused).

Registered under the ``torch_dynamo_backends`` entry point and importable directly:
``from dyllm_fx.backend import dyllm_backend``.
"""

from __future__ import annotations

import torch
from torch import fx

from .models.layers import default_position_ids
from .models.spec import DiffusionSpec
from .passes.capture import capture
from .passes.check_bidirectional import check_bidirectional
from .runtime.policies import make_policy
from .transform import TransformedModel, build_program

_ROLES = ("input_ids", "attention_mask", "position_ids")


def _placeholder_roles(gm: fx.GraphModule) -> dict[str, int]:
    """Which graph input is input_ids / attention_mask / position_ids (dynamo names them L_<arg>_)."""
    roles = {}
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        for role in _ROLES:
            if node.target.strip("_").lower().endswith(role):
                roles[role] = i
    if "input_ids" not in roles:
        raise ValueError(
            "the dyllm backend expects the model to be called as model(input_ids, attention_mask=..., "
            f"position_ids=...); graph inputs were {[n.target for n in gm.graph.nodes if n.op == 'placeholder']}"
        )
    return roles


def _size_inputs(gm: fx.GraphModule, roles: dict[str, int]) -> dict[int, tuple[str, int]]:
    """Graph inputs that are sizes (dynamo passes symbolic sizes as inputs once shapes are
    dynamic): input position -> (role, dim) of the input tensor they measure. The capture must
    read them off the traced tensors, so the step graph stays symbolic in those sizes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    shapes = {}
    for role, i in roles.items():
        val = placeholders[i].meta.get("example_value")
        if isinstance(val, torch.Tensor):
            shapes[role] = [str(s) for s in val.shape]
    sizes = {}
    for i, node in enumerate(placeholders):
        val = node.meta.get("example_value")
        if not isinstance(val, torch.SymInt):
            continue
        found = next(((role, d) for role, dims in shapes.items() for d, s in enumerate(dims) if s == str(val)), None)
        if found is None:
            raise ValueError(f"the dyllm backend cannot tell which input size the graph input '{node.target}' ({val}) is")
        sizes[i] = found
    return sizes


def dyllm_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None):
    opts = dict(options or {})
    policy = opts.pop("policy", "dense")
    compile_pieces = opts.pop("compile_pieces", True)
    mask_token_id = opts.pop("mask_token_id", None)
    roles = _placeholder_roles(gm)
    sizes = _size_inputs(gm, roles)
    args = list(example_inputs)

    def forward(input_ids, attention_mask, position_ids):
        call = list(args)
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        for role, i in roles.items():
            call[i] = given[role]
        for i, (role, dim) in sizes.items():
            call[i] = given[role].shape[dim]
        out = gm(*call)
        return out[0] if isinstance(out, (tuple, list)) else out

    spec = DiffusionSpec(mask_token_id=mask_token_id) if mask_token_id is not None else None
    built: list[TransformedModel] = []

    def transformed(inputs) -> TransformedModel:
        # Built on the first real call: inside this function dynamo's fake-tensor tracing
        # context is active, and the passes' own capture needs real parameters.
        if not built:
            ids = inputs[roles["input_ids"]]
            mask = inputs[roles["attention_mask"]] if "attention_mask" in roles else torch.ones_like(ids)
            pos = inputs[roles["position_ids"]] if "position_ids" in roles else default_position_ids(ids, mask)
            captured = capture(forward, (ids, mask, pos))
            check_bidirectional(captured.gm, (ids, mask, pos))
            program = build_program(captured)
            built.append(TransformedModel(program, make_policy(policy, **opts), spec, compile=compile_pieces))
        return built[0]

    def compiled(*inputs):
        model = transformed(inputs)
        mask_in = inputs[roles["attention_mask"]] if "attention_mask" in roles else None
        pos_in = inputs[roles["position_ids"]] if "position_ids" in roles else None
        with torch.no_grad():
            return (model(inputs[roles["input_ids"]], mask_in, pos_in),)

    compiled.transformed = built  # filled on first call: [TransformedModel] for inspection
    return compiled
