"""The plan keys a generation layout can reach, for the policies that choose rows in the step.

A row policy's step (``runtime/policies``) has one shape per plan key: a span width, a top-C
capacity, ES-dLLM's kept counts, the stats mode. An exported graph fixes those shapes, so the
export writes one graph per key, and this module lists the keys a generation can meet, from the
policy's parameters and a :class:`Layout` (gen_length, block_length, steps or threshold
decoding, the longest sequence). The lists are derived from each policy's ``plan()``; the tests
check them against the keys real generations meet (``tests/test_export_plans.py``).

Widths that equal the sequence length (DyLLM's full-query steps, a width capped at the
sequence length) are written ``"L"`` in a *graph key*: that graph's width is the sequence axis
itself, so one graph serves every prompt length. :func:`graph_key` turns a host key into its
graph key; :func:`bind` puts the (symbolic) sequence length back in while tracing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

from dyllm_fx.runtime.policies import DLLMCachePolicy, DyLLMPolicy, ESDLLMPolicy, Policy
from dyllm_fx.runtime.policies.dyllm import mlp_levels
from dyllm_fx.runtime.rows import bucket_size
from dyllm_fx.runtime.schedule import BlockSchedule

from .step_module import ExportError

SEQ = "L"  # a size equal to the sequence length, in a graph key
MAX_GRAPHS = 64  # more keys than this: the layout is too wide to export (the error says how to narrow it)


class PlanKeyError(ValueError):
    """The policy's plan keys cannot be listed for this layout; the message says what to change."""


@dataclass(frozen=True)
class Layout:
    """The generations an export serves: what fixes the step shapes a policy can reach.

    ``steps`` None: ``gen_length`` (one token per step, ``generate()``'s default);
    ``threshold``: confidence-threshold decoding (any number of tokens per step); ``max_seq``:
    the longest prompt + response (None: the model's window); ``max_commit``: the most tokens
    one step commits (None: from the schedule, the whole block for Dream's last step and under
    threshold decoding).
    """

    gen_length: int = 64
    block_length: int | None = 32
    steps: int | None = None
    threshold: bool = False
    max_seq: int | None = None
    max_commit: int | None = None

    def check(self, window: int | None) -> "Layout":
        """The layout with its defaults filled in; ValueError naming a bad combination."""
        steps = None if self.threshold else (self.gen_length if self.steps is None else self.steps)
        BlockSchedule.build(1, self.gen_length, self.block_length, steps)  # the loop's own checks
        max_seq = self.max_seq if self.max_seq is not None else (window or self.gen_length + 512)
        if max_seq <= self.gen_length:
            raise ValueError(
                f"max_seq={max_seq} leaves no room for a prompt before gen_length={self.gen_length}"
            )
        if window is not None and max_seq > window:
            raise ValueError(f"max_seq={max_seq} exceeds the model's window of {window} tokens")
        block = self.gen_length if self.block_length is None else self.block_length
        return Layout(self.gen_length, block, steps, self.threshold, max_seq, self.max_commit)

    @property
    def block(self) -> int:
        return self.gen_length if self.block_length is None else self.block_length

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block

    def steps_per_block(self) -> int | None:
        return None if self.threshold else self.steps // self.num_blocks

    def commits(self, dream: bool) -> int:
        """The most tokens one step commits (``last_committed``)."""
        if self.max_commit is not None:
            return self.max_commit
        spb = self.steps_per_block()
        if spb is None or dream:  # threshold decoding; Dream's last step commits what is left
            return self.block
        return math.ceil(self.block / spb)

    def in_block_steps(self) -> int:
        """The most steps a block takes (the loop's caps, ES-dLLM's extra steps included)."""
        spb = self.steps_per_block()
        return 2 * self.block if spb is None else spb + self.block

    def to_json(self) -> dict:
        return {
            "gen_length": self.gen_length,
            "block_length": self.block_length,
            "steps": self.steps,
            "threshold": self.threshold,
            "max_seq": self.max_seq,
            "max_commit": self.max_commit,
        }


# --- keys per policy, for one sequence length ---------------------------------------------------


def _capacities(policy: DyLLMPolicy, width: int) -> set[int]:
    """DyLLMPolicy._capacity's possible values for a span of ``width`` rows."""
    if policy.capacity == "full" or policy.tau >= 1.0:
        return {width}
    if isinstance(policy.capacity, int):
        return {min(policy.capacity, width)}
    return {width} | {bucket_size(n, width) for n in range(0, width + 1)}


def _mlp_capacities(policy: DyLLMPolicy, capacity: int) -> set[int | None]:
    """DyLLMPolicy._mlp_capacity's possible values at top-C capacity ``capacity``."""
    if not policy.mlp_batch_wide:
        return {None}
    if policy.capacity != "auto" or policy.tau >= 1.0:
        return {capacity}
    return set(mlp_levels(capacity))


def _dyllm_keys(
    policy: DyLLMPolicy, layout: Layout, seq_len: int, n_layers: int, shift: int, memo: dict
) -> set[tuple]:
    if policy.kv_batch_wide:
        raise ExportError(
            "DyLLM's flat row selection (kv_selection='batch') is not exported (its steps index the "
            "caches by (sequence, row) pairs); export with kv_selection='sequence', the default"
        )
    gen, block = layout.gen_length, layout.block
    prompt = seq_len - gen
    composed = policy.scope in ("block", "suffix")
    interval = policy.full_query_interval
    # which kinds of sparse step the schedule can take (over-approximated: a key never met
    # costs an export, a missing one fails the generation)
    query_modes = ([True] if interval is not None else []) + ([False] if interval != 1 else [])
    keys = {("full",)}
    for k in range(layout.num_blocks):
        start = prompt + k * block
        spans = {
            "all": (0, seq_len),
            "response": (prompt, seq_len),
            "block": (start, start + block),
            "suffix": (start, seq_len),
        }
        lo, hi = spans[policy.scope]
        for full_query in query_modes:
            a, b = (0, seq_len) if full_query and not composed else (lo, hi)
            width = bucket_size(b - a, seq_len) if policy.scope == "suffix" and not full_query else b - a
            stats = ["exact"] + (["cached"] if policy.cached_softmax_stats and not full_query else [])
            for capacity in _capacities(policy, width):
                for mlp in _mlp_capacities(policy, capacity):
                    for mode in stats:
                        keys.add(("sparse", width, capacity, mode, False, mlp))
        # composed: the dense warm-up steps and the periodic refreshes recompute the scope
        if composed and (policy.refresh_interval is not None or policy.num_full_steps > 1):
            width = bucket_size(hi - lo, seq_len) if policy.scope == "suffix" else hi - lo
            keys.add(("refresh", width))
    return keys


def _es_windows(
    policy: ESDLLMPolicy, layout: Layout, seq_len: int, shift: int, k: int, new_block: bool, prompt: bool
):
    """ESDLLMPolicy._window's possible window lengths (the longest of the batch) at block k."""
    start_row = seq_len - layout.gen_length + k * layout.block
    spans = {
        "all": (0, seq_len),
        "response": (seq_len - layout.gen_length, seq_len),
        "block": (start_row, start_row + layout.block),
        "suffix": (start_row, seq_len),
    }
    start, end = spans[policy.scope]
    if policy.scope != "all":
        start -= shift
    if policy.scope == "block":
        end -= shift
    start = max(start, 0)
    if prompt:
        return {end}
    if policy.scope == "block" and new_block and k > 0:
        # from the leftmost row the previous step decoded: a row of the previous block
        return {end - min(start, left - shift) for left in range(start_row - layout.block, start_row + 1)}
    return {end - start}


def _es_selections(policy: ESDLLMPolicy, window: int, block: int, floor: int, n_layers: int) -> tuple:
    current, selections = window, []
    for layer, keep in policy.layout(n_layers):
        kept = max(int(keep * window) if keep <= 1 else int(keep), floor)
        kept = min(kept, current)
        if kept != current:
            selections.append((layer, kept))
            current = kept
    return tuple(selections)


def _es_dllm_keys(
    policy: ESDLLMPolicy, layout: Layout, seq_len: int, n_layers: int, shift: int, memo: dict
) -> set[tuple]:
    block = layout.block
    floors = sorted({min(c + 2, block) for c in range(layout.commits(bool(shift)) + 1)})
    keys = {("full",)}
    for k in range(layout.num_blocks):
        # the official step counter (block offset + step in block) decides refreshes; only the
        # step classes matter, not which step
        classes = set()
        for j in range(layout.in_block_steps()):
            step = k * block + j
            if step == 0:
                continue
            prompt = step % policy.prompt_update_freq == 0
            classes.add((j == 0, prompt, prompt or step % policy.block_update_freq == 0))
        for new_block, prompt, refresh in classes:
            for window in _es_windows(policy, layout, seq_len, shift, k, new_block, prompt):
                width = bucket_size(window, seq_len)
                if refresh:
                    keys.add(("refresh", width))
                    continue
                for floor in floors:
                    selections = memo.get((window, floor))
                    if selections is None:
                        selections = memo[window, floor] = _es_selections(
                            policy, window, block, floor, n_layers
                        )
                    keys.add(("skip", width, selections))
    return keys


def _dllm_cache_keys(
    policy: DLLMCachePolicy, layout: Layout, seq_len: int, n_layers: int, shift: int, memo: dict
) -> set[tuple]:
    keys = {("full",)}
    prompt = seq_len - layout.gen_length
    for k in range(layout.num_blocks):
        start = prompt + k * layout.block
        spans = {
            "all": (0, seq_len),
            "response": (prompt, seq_len),
            "block": (start, start + layout.block),
            "suffix": (start, seq_len),
        }
        lo, hi = spans[policy.scope]
        keys.add(("response", hi - lo))
        if policy.ratio < 1.0:
            keys.add(("adaptive", hi - lo, max(1, math.ceil(policy.ratio * (hi - lo)))))
    return keys


# (policy class, enumerator, the size slots of each key kind: an index, or (index, i, j) for
# ES-dLLM's selections, which hold (layer, kept) pairs)
_POLICIES = [
    (DyLLMPolicy, _dyllm_keys, {"sparse": (1, 2, 5), "refresh": (1,)}),
    (ESDLLMPolicy, _es_dllm_keys, {"refresh": (1,), "skip": (1, "selections")}),
    (DLLMCachePolicy, _dllm_cache_keys, {"response": (1,), "adaptive": (1, 2)}),
]


def _entry(policy: Policy):
    for cls, enumerate_keys, slots in _POLICIES:
        if isinstance(policy, cls):
            return enumerate_keys, slots
    return None


def supports(policy: Policy) -> bool:
    """Whether this module can list ``policy``'s plan keys (the row policies and compositions)."""
    return _entry(policy) is not None


def graph_key(policy: Policy, key: tuple, seq_len: int) -> tuple:
    """``key`` with every size equal to ``seq_len`` written :data:`SEQ` (the graph's width is
    then the sequence axis: one graph for every prompt length)."""
    entry = _entry(policy)
    if entry is None or key[0] not in entry[1]:
        return key
    out = list(key)
    for slot in entry[1][key[0]]:
        if slot == "selections":
            out[2] = tuple((layer, SEQ if kept == seq_len else kept) for layer, kept in key[2])
        elif out[slot] == seq_len:
            out[slot] = SEQ
    return tuple(out)


def bind(key, seq_len):
    """A graph key with :data:`SEQ` replaced by ``seq_len`` (a SymInt while tracing)."""
    if key == SEQ:
        return seq_len
    if isinstance(key, tuple):
        return tuple(bind(k, seq_len) for k in key)
    return key


@dataclass(frozen=True)
class KeyRange:
    """A graph key and the sequence lengths it is reached at (its graph's seq axis range)."""

    key: tuple
    min_seq: int
    max_seq: int


def plan_keys(
    policy: Policy, layout: Layout, n_layers: int, shift: int, max_graphs: int = MAX_GRAPHS
) -> list[KeyRange]:
    """The graph keys ``policy`` can reach on generations of ``layout`` (filled by
    :meth:`Layout.check`), each with the sequence lengths it serves, in a fixed order."""
    entry = _entry(policy)
    if entry is None:
        raise PlanKeyError(f"no plan-key list for policy {policy.name!r} ({type(policy).__name__})")
    enumerate_keys = entry[0]
    ranges: dict[tuple, list[int]] = {}
    memo: dict = {}  # per-policy results that do not depend on the sequence length
    for seq_len in range(layout.gen_length + 1, layout.max_seq + 1):
        for key in enumerate_keys(policy, layout, seq_len, n_layers, shift, memo):
            gkey = graph_key(policy, key, seq_len)
            lo_hi = ranges.setdefault(gkey, [seq_len, seq_len])
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


def encode_key(key) -> str:
    """A key as JSON (tuples as lists)."""
    return json.dumps(key, separators=(",", ":"))


def decode_key(data) -> tuple:
    """The inverse of :func:`encode_key` on parsed JSON: lists back to tuples."""
    if isinstance(data, str) and data.startswith("["):
        data = json.loads(data)
    if isinstance(data, list):
        return tuple(decode_key(d) for d in data)
    return data


def key_sizes(key) -> Iterable[int]:
    """Every int in a key (to keep trace-time example sizes apart from them)."""
    if isinstance(key, bool):
        return
    if isinstance(key, int):
        yield key
    elif isinstance(key, tuple):
        for k in key:
            yield from key_sizes(k)


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
    "key_sizes",
    "plan_keys",
    "supports",
]
