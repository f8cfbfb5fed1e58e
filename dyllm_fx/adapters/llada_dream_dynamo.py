"""The ``dyllm`` dynamo backend for LLaDA / Dream style models (``dyllm_fx.backend`` picks it).

The passes need a graph whose sizes are symbolic, so that its pieces run on any number of rows.
Dynamo's first graph of a module is static (sizes are literals: ``view(1, 29, 4, 32)``), so this
captures the *module* dynamo is compiling itself, as ``transform()`` does. Only when no module
can be found (a compiled free function) does it fall back to dynamo's graph, which then must
have been traced with ``dynamic=True``.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..models.layers import default_position_ids
from ..models.spec import DiffusionSpec
from ..passes.capture import capture
from ..passes.pipeline import PASSES
from ..runtime.policies import make_policy
from .transformed import TransformedModel

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
            "position_ids=...); graph inputs were "
            f"{[n.target for n in gm.graph.nodes if n.op == 'placeholder']}"
        )
    return roles


def _size_inputs(gm: fx.GraphModule, roles: dict[str, int]) -> dict[int, tuple[str, int]]:
    """Graph inputs that are sizes (dynamo passes symbolic sizes as inputs once shapes are
    dynamic): input position -> (role, dim) of the input tensor they measure."""
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
        found = next(
            ((role, d) for role, dims in shapes.items() for d, s in enumerate(dims) if s == str(val)), None
        )
        if found is None:
            raise ValueError(
                f"the dyllm backend cannot tell which input size the graph input '{node.target}' ({val}) is"
            )
        sizes[i] = found
    return sizes


def _is_static(gm: fx.GraphModule) -> bool:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return not any(isinstance(n.meta.get("example_value"), torch.SymInt) for n in placeholders)


def dynamo_step(adapter, module: nn.Module | None, gm: fx.GraphModule, example_inputs: list, options: dict):
    """The backend's callable for a graph of a LLaDA / Dream style forward (see ``dyllm_fx.backend``);
    ``module`` is the module dynamo compiles, or None for a free function."""
    opts = dict(options)
    policy = opts.pop("policy", "dense")
    compile_step = opts.pop("compile_step", opts.pop("compile_pieces", True))
    mask_token_id = opts.pop("mask_token_id", None)
    block_length = opts.pop("block_length", None)
    roles = _placeholder_roles(gm)
    sizes = _size_inputs(gm, roles)
    args = list(example_inputs)
    spec = adapter.diffusion_spec(module, None)
    if mask_token_id is not None:
        spec = DiffusionSpec(mask_token_id=mask_token_id) if spec is None else spec
        if spec.mask_token_id != mask_token_id:
            raise ValueError(
                f"mask_token_id={mask_token_id} differs from the model's ({spec.mask_token_id}); drop the "
                "option"
            )
    chosen = make_policy(policy, family=adapter.policy_family(spec), **opts)  # bad policy parameters fail now
    if module is None and _is_static(gm) and chosen.name != "dense":
        raise ValueError(
            "the dyllm backend got a graph with static sizes and no module to trace again; compile the model "
            "module itself (torch.compile(model, backend='dyllm')) or pass dynamic=True"
        )

    def forward(input_ids, attention_mask, position_ids):
        call = list(args)
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        for role, i in roles.items():
            call[i] = given[role]
        for i, (role, dim) in sizes.items():
            call[i] = given[role].shape[dim]
        out = gm(*call)
        return out[0] if isinstance(out, (tuple, list)) else out

    built: list[TransformedModel] = []

    def transformed(inputs) -> TransformedModel:
        # Built on the first real call: inside this function dynamo's fake-tensor tracing
        # context is active, and the passes' own capture needs real parameters.
        if not built:
            ids = inputs[roles["input_ids"]]
            mask = inputs[roles["attention_mask"]] if "attention_mask" in roles else torch.ones_like(ids)
            pos = (
                inputs[roles["position_ids"]] if "position_ids" in roles else default_position_ids(ids, mask)
            )
            if module is not None:
                captured, traced_with = adapter.capture(module, device=ids.device)
            else:
                captured, traced_with = capture(forward, (ids, mask, pos)), (ids, mask, pos)
            program = PASSES.run(captured, traced_with)
            built.append(
                adapter.build(program, chosen, module, spec, compile=compile_step, block_length=block_length)
            )
        return built[0]

    def compiled(*inputs):
        model = transformed(inputs)
        mask_in = inputs[roles["attention_mask"]] if "attention_mask" in roles else None
        pos_in = inputs[roles["position_ids"]] if "position_ids" in roles else None
        with torch.no_grad():
            return (model(inputs[roles["input_ids"]], mask_in, pos_in),)

    compiled.transformed = built  # filled on first call: [TransformedModel] for inspection
    return compiled


__all__ = ["dynamo_step"]
