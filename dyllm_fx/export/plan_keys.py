"""The graph keys an export writes: each policy's plan keys for a layout, with the sequence
lengths each one serves.

A row policy's step (``runtime/policies``) has one shape per plan key; an exported graph fixes
those shapes, so the export writes one graph per key. The policy lists the keys a generation can
meet (``Policy.plan_keys``, from its own sizing code and a
:class:`~dyllm_fx.runtime.schedule.Layout`); the tests check them against the keys real
generations meet (``tests/test_export_plans.py``).

Sizes that equal the sequence length (DyLLM's full-query steps, a width capped at the sequence
length) are written ``"L"`` in a *graph key*: that graph's width is the sequence axis itself, so
one graph serves every prompt length. :func:`graph_key` turns a host key into its graph key;
:func:`bind` puts the (symbolic) sequence length back in while tracing.
"""

from __future__ import annotations

from dataclasses import dataclass

from dyllm_fx.runtime.policies import Policy
from dyllm_fx.runtime.policies.keys import SEQ, PlanKey, PlanKeyError, decode_key, encode_key
from dyllm_fx.runtime.schedule import Layout

from .step_module import ExportError

MAX_GRAPHS = 64  # more keys than this: the layout is too wide to export (the error says how to narrow it)


def supports(policy: Policy) -> bool:
    """Whether ``policy`` lists its plan keys (the row policies and their compositions)."""
    return type(policy).plan_keys is not Policy.plan_keys


def graph_key(key: PlanKey, seq_len: int) -> PlanKey:
    """``key`` with every size equal to ``seq_len`` written :data:`SEQ` (the graph's width is
    then the sequence axis: one graph for every prompt length)."""
    return key.map_sizes(lambda n: SEQ if n == seq_len else n)


def bind(key: PlanKey, seq_len) -> PlanKey:
    """A graph key with :data:`SEQ` replaced by ``seq_len`` (a SymInt while tracing)."""
    return key.map_sizes(lambda n: seq_len if n == SEQ else n)


@dataclass(frozen=True)
class KeyRange:
    """A graph key and the sequence lengths it is reached at (its graph's seq axis range)."""

    key: PlanKey
    min_seq: int
    max_seq: int


def plan_keys(
    policy: Policy, layout: Layout, n_layers: int, shift: int, max_graphs: int = MAX_GRAPHS
) -> list[KeyRange]:
    """The graph keys ``policy`` can reach on generations of ``layout`` (filled by
    :meth:`Layout.check`), each with the sequence lengths it serves, in a fixed order."""
    if not supports(policy):
        raise PlanKeyError(f"no plan-key list for policy {policy.name!r} ({type(policy).__name__})")
    ranges: dict[PlanKey, list[int]] = {}
    for seq_len in layout.seq_lens():
        try:
            keys = policy.plan_keys(layout, seq_len, n_layers, shift)
        except PlanKeyError as err:  # a mode of the policy that has no exported step
            raise ExportError(str(err)) from err
        for key in keys:
            lo_hi = ranges.setdefault(graph_key(key, seq_len), [seq_len, seq_len])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], seq_len), max(lo_hi[1], seq_len)
        if len(ranges) > max_graphs:
            raise PlanKeyError(
                f"policy {policy.name!r} reaches more than {max_graphs} step shapes (plan keys) on this "
                "layout "
                f"(gen_length={layout.gen_length}, block_length={layout.block}, max_seq={layout.max_seq}, "
                f"{'threshold decoding' if layout.threshold else f'steps={layout.steps}'}); one graph is "
                "exported per "
                "shape. Narrow the layout (a smaller max_seq or max_commit, a fixed capacity) or use a "
                "policy scope "
                "whose sizes do not grow with the prompt (scope='all' does)"
            )
    order = sorted(ranges, key=encode_key)
    return [KeyRange(k, *ranges[k]) for k in order]


__all__ = [
    "KeyRange",
    "Layout",
    "MAX_GRAPHS",
    "PlanKeyError",
    "SEQ",
    "bind",
    "decode_key",
    "encode_key",
    "graph_key",
    "plan_keys",
    "supports",
]
