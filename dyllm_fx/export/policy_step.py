"""A row policy's own step, for one plan key, as a functional module torch.export can take.

The engine runs ``policy.step(pieces, plan, inp, cache, buffers)``: tensor code that updates
the K/V cache, the final hidden state and the policy's buffers in place. :class:`PolicyStep`
calls exactly that function on *copies* of its state inputs and returns the copies, so the
traced program is functional (torch.export turns the in-place writes into ``scatter`` /
``index_put`` of new tensors) and every piece of state is an explicit input and output:

    forward(input_ids, attention_mask, position_ids, logit_positions, span_start, span_len,
            *params, *sizes, *state) -> (logits, eligible, counts, *state')

* ``params``: the policy parameters that are graph inputs (DyLLM's ``tau``, a 0-d float32);
* ``sizes``: the plan key's sizes, each the length of a 1-D int64 tensor (``size_0``...; a
  dynamic axis, values unread), so that one graph serves every key of a branch
  (``plan_keys.branch_key``); a branch with fewer sizes ignores the rest;
* ``state``: the cache (``k_cache_i``, ``v_cache_i``, ``hidden``) then the policy's buffers
  (:class:`StateLayout` names them: ``context_0``, ``mlp_0``, ``prev_ids``, ``snapshot_1``...);
* ``eligible`` (B, P) bool is all True where the step returns none, ``counts`` is padded with
  zeros to the policy's longest (the host reads only the branch's own ``counts_len``), so every
  branch's graph has the same outputs.

The branch key fixes the code the step runs (``plan_keys``), the size inputs its shapes. Traced
on any device with the plain-torch ops
(:func:`plain_torch_ops`), so the graph holds standard aten ops only.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, fields, is_dataclass, replace

import torch
from torch import nn

from dyllm_fx.runtime.cache import StepCache
from dyllm_fx.runtime.pieces import Pieces
from dyllm_fx.runtime.policies import HostState, Plan, Policy, StepInputs
from dyllm_fx.runtime.policies.keys import FullKey, PlanKey

from .plan_keys import SEQ, Branch, bind, branch_sizes, with_sizes

STEP_INPUTS = ("input_ids", "attention_mask", "position_ids", "logit_positions", "span_start", "span_len")
STEP_OUTPUTS = ("logits", "eligible", "counts")


def size_names(n_sizes: int) -> list[str]:
    """The graph inputs that carry a plan key's sizes as their lengths."""
    return [f"size_{i}" for i in range(n_sizes)]


def size_inputs(sizes, n_sizes: int, device=None) -> list[torch.Tensor]:
    """The size inputs of a step with ``sizes`` (a key's, in ``key_sizes`` order), padded with
    length-1 inputs to ``n_sizes``."""
    lengths = [int(n) for n in sizes] + [1] * (n_sizes - len(sizes))
    return [torch.zeros(n, dtype=torch.long, device=device) for n in lengths]


@contextlib.contextmanager
def plain_torch_ops():
    """Trace the step with the ops' plain-torch implementations on every device (on CUDA the
    runtime would call the Triton custom ops, which ONNX and TensorRT cannot take)."""
    from dyllm_fx.kernels import dispatch

    saved = dispatch._uses_kernel
    dispatch._uses_kernel = lambda t: False
    try:
        yield
    finally:
        dispatch._uses_kernel = saved


# --- the state: cache + buffers as named tensors --------------------------------------------------


@dataclass(frozen=True)
class StateEntry:
    """One state tensor: its name, shape (``"batch"`` / ``"seq"`` for the dynamic axes), dtype
    (a torch dtype name) and the value ``allocate`` fills it with."""

    name: str
    shape: tuple
    dtype: str
    fill: float

    def concrete(self, batch: int, seq_len: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else seq_len if d == "seq" else d for d in self.shape)

    def to_json(self) -> list:
        return [self.name, list(self.shape), self.dtype, self.fill]

    @classmethod
    def from_json(cls, data) -> "StateEntry":
        name, shape, dtype, fill = data
        return cls(name, tuple(shape), dtype, float(fill))


def _flatten(obj, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a buffers object (dataclasses, lists, dicts), in a
    fixed order; ``_rebuild`` puts tensors back in the same order."""
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, (list, tuple)):
        return [item for i, v in enumerate(obj) for item in _flatten(v, f"{prefix}_{i}")]
    if isinstance(obj, dict):
        return [item for k, v in obj.items() for item in _flatten(v, f"{prefix}_{k}")]
    if is_dataclass(obj):
        return [
            item
            for f in fields(obj)
            for item in _flatten(getattr(obj, f.name), f.name if not prefix else f"{prefix}_{f.name}")
        ]
    return []


def _rebuild(template, tensors: list[torch.Tensor]):
    """``template`` with its tensors replaced, in ``_flatten`` order, by ``tensors`` (consumed)."""
    if template is None:
        return None
    if isinstance(template, torch.Tensor):
        return tensors.pop(0)
    if isinstance(template, list):
        return [_rebuild(v, tensors) for v in template]
    if isinstance(template, tuple):
        return tuple(_rebuild(v, tensors) for v in template)
    if isinstance(template, dict):
        return {k: _rebuild(v, tensors) for k, v in template.items()}
    if is_dataclass(template):
        return replace(
            template, **{f.name: _rebuild(getattr(template, f.name), tensors) for f in fields(template)}
        )
    return template


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class StateLayout:
    """The step's state: the K/V cache, the final hidden state, then the policy's buffers.

    Found by allocating them at two (batch, length) sizes: the axes that follow the batch or
    the length are the dynamic ones."""

    def __init__(self, program, policy: Policy, device: torch.device | str = "cpu"):
        device = torch.device(device)
        sizes = [(2, 23), (3, 29)]
        flat = []
        for batch, seq_len in sizes:
            cache = StepCache.allocate(program, batch, seq_len, device)
            buffers = policy.allocate(program, batch, seq_len, device)
            names = (
                [f"k_cache_{i}" for i in range(len(cache.k))]
                + [f"v_cache_{i}" for i in range(len(cache.v))]
                + ["hidden"]
            )
            flat.append((list(zip(names, cache.tensors)) + _flatten(buffers, ""), buffers))
        self.template = flat[0][1]  # the buffers object whose structure _rebuild fills
        self.n_cache = 2 * len(program.kv_shapes) + 1
        entries = []
        for (name, a), (_, b) in zip(flat[0][0], flat[1][0]):
            axes = {(sizes[0][0], sizes[1][0]): "batch", (sizes[0][1], sizes[1][1]): "seq"}
            shape = [x if x == y else axes.get((x, y)) for x, y in zip(a.shape, b.shape)]
            if None in shape or a.dim() != b.dim():
                raise ValueError(
                    f"policy buffer {name!r} {tuple(a.shape)} does not scale with batch and length"
                )
            values = a.flatten()
            fill = float(values[0]) if values.numel() else 0.0
            if values.numel() and not bool(
                (values == values[0]).all() | (values.isnan().all() & values[0].isnan())
            ):
                raise ValueError(
                    f"policy buffer {name!r} does not start as one constant; the exported runner zeros it"
                )
            entries.append(StateEntry(name, tuple(shape), _dtype_name(a.dtype), fill))
        self.entries = entries

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def split(self, tensors: list[torch.Tensor], batch: int, seq_len: int):
        """(StepCache, buffers) over ``tensors`` (in ``entries`` order)."""
        n_layers = (self.n_cache - 1) // 2
        k, v, hidden = tensors[:n_layers], tensors[n_layers : 2 * n_layers], tensors[2 * n_layers]
        cache = StepCache(list(k), list(v), hidden, batch, seq_len, warm=True)
        return cache, _rebuild(self.template, list(tensors[self.n_cache :]))


# --- the module ---------------------------------------------------------------------------


def export_policy(policy: Policy, spec) -> Policy:
    """A copy of ``policy`` to trace with: nothing recorded, and primed by one cold plan, so
    host-side values a step reads (ES-dLLM's mask id and logit shift) are set."""
    traced = copy.deepcopy(policy)
    traced.record_similarity = False
    ids = torch.full((1, 4), spec.mask_token_id, dtype=torch.long)
    traced.plan(
        HostState(
            ids,
            torch.ones_like(ids),
            True,
            1,
            block_start=2,
            block_end=4,
            response_start=2,
            mask_token_id=spec.mask_token_id,
            eos_token_ids=tuple(spec.eos_token_ids),
            logits_shift=spec.logits_shift,
        )
    )
    traced.reset()
    return traced


def graph_params(policy: Policy) -> dict[str, float]:
    """The policy parameters an exported graph takes as inputs (changing them needs no
    re-export): DyLLM's tau, unless ``every_row`` (every row recomputed without comparing)."""
    from dyllm_fx.runtime.policies import DyLLMPolicy

    if isinstance(policy, DyLLMPolicy) and not policy.every_row:
        return {"tau": float(policy.tau)}
    return {}


class PolicyStep(nn.Module):
    """``policy``'s step for one branch of plan keys, functional (see the module docstring)."""

    def __init__(
        self,
        program,
        policy: Policy,
        layout: StateLayout,
        params: dict[str, float],
        counts_len: int,
        n_sizes: int = 0,
    ):
        super().__init__()
        # The program's graph modules, registered so their (shared) weights are parameters.
        self.graphs = nn.ModuleList(
            [
                program.prologue,
                *(p.gm for p in program.attn),
                *(p.gm for p in program.mlp),
                program.epilogue.gm,
                *(m for part in program.attn_parts for m in (part.query, part.kv, part.post)),
            ]
        )
        self.pieces = Pieces(program)
        self.policy = policy
        self.layout = layout
        self.params = list(params)
        self.param_values = list(params.values())
        self.counts_len = counts_len
        self.n_sizes = n_sizes
        self.key: PlanKey = FullKey()  # a branch key (plan_keys.branch_key)
        self.spec = None
        # what the last (eager) call's step returned: its counts' length, whether it had eligible
        self.last_counts = 0
        self.last_eligible = False

    def forward(self, input_ids, attention_mask, position_ids, logit_positions, span_start, span_len, *rest):
        n_params, n_sizes = len(self.params), self.n_sizes
        params = dict(zip(self.params, rest[:n_params]))
        sizes = [t.shape[0] for t in rest[n_params : n_params + n_sizes]]
        state = [t.clone() for t in rest[n_params + n_sizes :]]  # written in place below, returned
        bsz, seq_len = input_ids.shape
        cache, buffers = self.layout.split(state, bsz, seq_len)
        inp = StepInputs(
            input_ids,
            attention_mask,
            position_ids,
            logit_positions,
            block_rows=logit_positions,
            span_start=span_start,
            span_len=span_len,
            tau=params.get("tau"),
        )
        key = bind(with_sizes(self.key, sizes), seq_len)
        out = self.policy.step(self.pieces, Plan(key), inp, cache, buffers)
        self.last_eligible = out.eligible is not None
        self.last_counts = 0 if out.counts is None else int(out.counts.shape[0])
        eligible = (
            out.eligible if out.eligible is not None else torch.ones_like(logit_positions, dtype=torch.bool)
        )
        counts = torch.zeros(self.counts_len, dtype=torch.long, device=input_ids.device)
        if out.counts is not None:
            counts = torch.cat([out.counts.long(), counts[out.counts.shape[0] :]])
        new_state = [*cache.k, *cache.v, cache.hidden] + [t for _, t in _flatten(buffers, "")]
        return (out.logits, eligible, counts, *new_state)


# --- example inputs and dynamic shapes per key -------------------------------------------------


def _fresh(avoid: set[int], start: int) -> int:
    n = start
    while n in avoid:
        n += 1
    return n


def _distinct(sizes: list[int], taken: set[int]) -> list[int]:
    """``sizes`` each moved to the nearest value not in ``taken`` (nor 1 or 2), downwards first
    so that a size stays within the one it was cut from; ``taken`` grows with them."""
    out = []
    for size in sizes:
        n = size
        while n in taken and n > 3:
            n -= 1
        if n in taken or n < 3:
            n = _fresh(taken, max(size, 3))
        taken.add(n)
        out.append(n)
    return out


def example_inputs(
    layout: StateLayout, branch: Branch, params: dict[str, float], spec, block: int, device, n_sizes: int
) -> tuple:
    """Inputs to trace ``branch``'s step with: a left-padded batch of 2, at a length its
    example member serves, with that member's sizes. The sizes differ from each other, from the
    batch, the length and the logit positions (so that torch.export ties no two of them
    together); the span covers the key's width."""
    member = branch.example
    avoid = set(member.key.ints()) | {1, 2}
    seq_len = _fresh(avoid, member.min_seq)
    if seq_len > member.max_seq:
        seq_len = member.min_seq
    positions = _fresh(avoid | {seq_len}, min(block, seq_len - 1))
    if positions >= seq_len:
        positions = _fresh(avoid | {seq_len}, 3)
    taken = {1, 2, seq_len, positions}
    sizes = _distinct(branch_sizes(branch.key, bind(member.key, seq_len)), taken)
    key = bind(with_sizes(branch.key, sizes), seq_len)
    sizes += _distinct([3] * (n_sizes - len(sizes)), taken)  # unread: any length but 0 or 1
    width = getattr(key, "width", seq_len)
    width = seq_len if width == SEQ else min(int(width), seq_len)
    bsz = 2
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 30, (bsz, seq_len), generator=gen)
    ids[:, seq_len - positions :] = spec.mask_token_id
    mask = torch.ones(bsz, seq_len, dtype=torch.long)
    mask[1, :1] = 0  # left padding
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    logit_pos = torch.arange(seq_len - positions, seq_len).expand(bsz, -1).contiguous()
    span_start = torch.full((bsz,), seq_len - width, dtype=torch.long)
    span_len = torch.full((bsz,), width, dtype=torch.long)
    values = [torch.tensor(v, dtype=torch.float32) for v in params.values()]
    state = [
        torch.full(e.concrete(bsz, seq_len), e.fill, dtype=getattr(torch, e.dtype)) for e in layout.entries
    ]
    tensors = (ids, mask, pos, logit_pos, span_start, span_len, *values, *size_inputs(sizes, n_sizes), *state)
    return tuple(t.to(device) for t in tensors)


def dynamic_shapes(
    layout: StateLayout, n_params: int, n_sizes: int, min_seq: int, max_seq: int, max_batch: int = 4096
):
    """torch.export dims for :class:`PolicyStep`: batch, sequence (within the branch's range),
    logit positions and the key's sizes (each at most the longest sequence)."""
    dim = torch.export.Dim
    batch = dim("batch", min=1, max=max_batch)
    seq = dim("seq", min=min_seq, max=max_seq)
    npos = dim("positions", min=1, max=max_seq)
    tokens = {0: batch, 1: seq}
    sizes = tuple({0: dim(name, min=1, max=max_seq)} for name in size_names(n_sizes))
    state = tuple(
        {i: batch if d == "batch" else seq for i, d in enumerate(e.shape) if isinstance(d, str)}
        for e in layout.entries
    )
    return (
        tokens,
        tokens,
        tokens,
        {0: batch, 1: npos},
        {0: batch},
        {0: batch},
        (*([None] * n_params), *sizes, *state),
    )


__all__ = [
    "PolicyStep",
    "STEP_INPUTS",
    "STEP_OUTPUTS",
    "StateEntry",
    "StateLayout",
    "dynamic_shapes",
    "example_inputs",
    "export_policy",
    "graph_params",
    "plain_torch_ops",
    "size_inputs",
    "size_names",
]
