"""The graph keys an export writes: each policy's plan keys for a layout, with the sequence
lengths each one serves.

A row policy's step (``runtime/policies``) has one shape per plan key. The policy lists the keys
a generation can meet (``Policy.plan_keys``, from its own sizing code and a
:class:`~dyllm_fx.runtime.schedule.Layout`); the tests check them against the keys real
generations meet (``tests/test_export_plans.py``).

Sizes that equal the sequence length (DyLLM's full-query steps, a width capped at the sequence
length) are written ``"L"`` in a *graph key*: that graph's width is the sequence axis itself, so
one graph serves every prompt length. :func:`graph_key` turns a host key into its graph key.

Keys that differ only in their sizes run the same code on other shapes, so one exported graph,
a *branch*, serves them all: its :func:`branch_key` writes every size :data:`ANY`, and the graph
takes each size as the length of a 1-D input (``size_0``, ``size_1``...; their values are not
read), a dynamic axis like the batch. DyLLM's capacity buckets and span widths are then one
graph instead of one each, which is most of an export's time.
"""

from __future__ import annotations

from dataclasses import dataclass

from dyllm_fx.runtime.policies import Policy
from dyllm_fx.runtime.policies.keys import SEQ, PlanKey, PlanKeyError, decode_key, encode_key
from dyllm_fx.runtime.schedule import Layout

from .step_module import ExportError

ANY = "*"  # a size the graph takes as an input, in a branch key
MAX_GRAPHS = 64  # more keys than this: the layout is too wide to export (the error says how to narrow it)


def supports(policy: Policy) -> bool:
    """Whether ``policy`` lists its plan keys (the row policies and their compositions)."""
    return type(policy).plan_keys is not Policy.plan_keys


def graph_key(key: PlanKey, seq_len: int) -> PlanKey:
    """``key`` with every size equal to ``seq_len`` written :data:`SEQ` (the graph's width is
    then the sequence axis: one graph for every prompt length)."""
    return key.map_sizes(lambda n: SEQ if n == seq_len else n)


def bind(key: PlanKey, seq_len: int) -> PlanKey:
    """A graph key with :data:`SEQ` replaced by ``seq_len``."""
    return key.map_sizes(lambda n: seq_len if n == SEQ else n)


def key_sizes(key: PlanKey) -> list:
    """Every size of ``key``, in the order :meth:`PlanKey.map_sizes` visits them."""
    found: list = []
    key.map_sizes(lambda n: found.append(n) or n)
    return found


def branch_key(key: PlanKey) -> PlanKey:
    """``key`` with every size written :data:`ANY`: the graph that serves every key of its shape."""
    return key.map_sizes(lambda n: ANY)


def with_sizes(key: PlanKey, sizes) -> PlanKey:
    """A branch key with its :data:`ANY` sizes, in :func:`key_sizes` order, set to ``sizes``
    (SymInts while tracing; any beyond the key's own are ignored)."""
    it = iter(sizes)
    return key.map_sizes(lambda n: next(it) if n == ANY else n)


def branch_sizes(branch: PlanKey, key: PlanKey) -> list:
    """The sizes of ``key`` (a key of ``branch``) that the branch takes as inputs."""
    return [n for b, n in zip(key_sizes(branch), key_sizes(key)) if b == ANY]


@dataclass(frozen=True)
class KeyRange:
    """A graph key and the sequence lengths it is reached at (its graph's seq axis range)."""

    key: PlanKey
    min_seq: int
    max_seq: int


@dataclass(frozen=True)
class Branch:
    """One exported graph: a branch key and the graph keys it serves (``members``)."""

    key: PlanKey
    members: tuple[KeyRange, ...]

    @property
    def min_seq(self) -> int:
        return min(m.min_seq for m in self.members)

    @property
    def max_seq(self) -> int:
        return max(m.max_seq for m in self.members)

    @property
    def example(self) -> KeyRange:
        """The member traced (the one that fits the shortest sequences)."""
        return min(self.members, key=lambda m: m.min_seq)


def branches(ranges: list[KeyRange], by_shape: bool = True) -> list[Branch]:
    """``ranges`` grouped by :func:`branch_key`, in the order of their first member; with
    ``by_shape=False`` one branch per key, its sizes fixed (for backends that keep the runtime
    asserts a trace records about its sizes, such as ``torch.export`` programs)."""
    if not by_shape:
        return [Branch(kr.key, (kr,)) for kr in ranges]
    groups: dict[PlanKey, list[KeyRange]] = {}
    for kr in ranges:
        groups.setdefault(branch_key(kr.key), []).append(kr)
    return [Branch(key, tuple(members)) for key, members in groups.items()]


def size_count(branch_keys) -> int:
    """How many size inputs the graphs of ``branch_keys`` take: the most :data:`ANY` sizes one
    holds."""
    return max((key_sizes(key).count(ANY) for key in branch_keys), default=0)


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
    "ANY",
    "Branch",
    "KeyRange",
    "Layout",
    "MAX_GRAPHS",
    "PlanKeyError",
    "SEQ",
    "bind",
    "branch_key",
    "branch_sizes",
    "branches",
    "decode_key",
    "encode_key",
    "graph_key",
    "key_sizes",
    "plan_keys",
    "size_count",
    "supports",
    "with_sizes",
]
