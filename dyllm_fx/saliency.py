"""Per-step, per-layer traces of what a transformed model recomputed, for the saliency plot.

The sparse engine records, per step, each layer's active-row count and (when the policy
measures it, e.g. DyLLM) each position's cosine similarity of the attention context to the
previous step's. Which positions were active is not part of the record, so
:class:`RowRecorder` listens to the policy's ``rows`` / ``after_attention`` answers while a
generation runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

# Values of the active-rows map: what a position got at a (step, layer).
CACHED, ATTENTION_ONLY, RECOMPUTED = 0.0, 0.5, 1.0


class RowRecorder:
    """Records, for batch row 0, the positions a policy made active at every step and layer.

    Patches the policy *instance* (its class and any state the engine sets on it stay as they
    are) and restores it on exit. A layer missing from a step's entry ran every row (the
    engine does not ask the policy on a cold-cache step).
    """

    _HOOKS = ("begin_step", "rows", "after_attention", "approx_layer", "approx_salient")

    def __init__(self, policy):
        self.policy = policy
        self.steps: list[dict[int, tuple[torch.Tensor, torch.Tensor | None]]] = []

    def __enter__(self) -> "RowRecorder":
        p = self.policy
        self._saved = {n: p.__dict__[n] for n in self._HOOKS if n in p.__dict__}
        begin, rows, after = p.begin_step, p.rows, p.after_attention

        def begin_step(state):
            self.steps.append({})
            return begin(state)

        def rows_hook(layer, state):
            chosen = rows(layer, state)
            if chosen is not None:
                self.steps[-1][layer] = (chosen[0].detach().cpu(), None)
            return chosen

        def after_attention(layer, padded_rows, context):
            subset = after(layer, padded_rows, context)
            if subset is not None:  # positions into the (padded) rows that also run the MLP
                attn_rows = padded_rows[0].detach().cpu()
                self.steps[-1][layer] = (attn_rows, attn_rows[subset[0].detach().cpu()])
            return subset

        p.begin_step, p.rows, p.after_attention = begin_step, rows_hook, after_attention
        if getattr(p, "approximate", False):
            self._hook_approximate(p)
        return self

    def _hook_approximate(self, p) -> None:
        """DyLLM-style policies: every row of the queried span gets o_proj and an approximate
        context; the salient rows also get the MLP. The span comes from ``approx_layer`` (None:
        the layer runs every row), the salient set (-1 padded) from ``approx_salient``."""
        plan_of, salient_of = p.approx_layer, p.approx_salient
        spans: dict[int, tuple[int, int]] = {}

        def approx_layer(layer, state):
            plan = plan_of(layer, state)
            if plan is not None:
                spans[layer] = plan[0], plan[1]
            else:
                spans.pop(layer, None)
            return plan

        def approx_salient(layer, cos, start):
            salient = salient_of(layer, cos, start)
            if layer in spans:
                first = salient[0].detach().cpu()
                self.steps[-1][layer] = (torch.arange(*spans[layer]), first[first >= 0])
            return salient

        p.approx_layer, p.approx_salient = approx_layer, approx_salient

    def __exit__(self, *exc) -> None:
        for name in self._HOOKS:
            self.policy.__dict__.pop(name, None)
        self.policy.__dict__.update(self._saved)

    def active_map(self, layer: int, seq_len: int) -> np.ndarray:
        """(steps, seq_len): RECOMPUTED, ATTENTION_ONLY or CACHED per position for ``layer``."""
        out = np.full((len(self.steps), seq_len), RECOMPUTED, dtype=np.float32)
        for i, step in enumerate(self.steps):
            if layer not in step:
                continue
            attn_rows, mlp_rows = step[layer]
            out[i] = CACHED
            out[i, attn_rows.numpy()] = ATTENTION_ONLY if mlp_rows is not None else RECOMPUTED
            if mlp_rows is not None:
                out[i, mlp_rows.numpy()] = RECOMPUTED
        return out


@dataclass
class SaliencyTrace:
    """What one generation recomputed, ready to plot.

    Attributes:
        active_fraction: (steps, layers) fraction of rows each layer recomputed.
        active_rows: (steps, seq_len) for ``layer``: 1 recomputed, 0.5 attention only, 0 cached.
        similarity: (steps, seq_len) cosine similarity for ``layer`` (NaN: not measured), or
            None when the policy measured none.
        layer: the layer of the per-position maps.
        prompt_length: positions before it are the (left-padded) prompt.
        policy: the policy's name.
    """

    active_fraction: np.ndarray
    active_rows: np.ndarray
    similarity: np.ndarray | None
    layer: int
    prompt_length: int
    policy: str


def trace_from_records(records, recorder: RowRecorder | None, layer: int, prompt_length: int, policy: str) -> SaliencyTrace:
    """Build a :class:`SaliencyTrace` from the engine's StepRecords (batch row 0)."""
    if not records:
        raise ValueError("no step records: run a generation on a transformed model (dyllm_fx.transform) first")
    n_layers, seq_len = len(records[0].active), records[0].seq_len
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range; the model has layers 0..{n_layers - 1}")
    fraction = np.array([[a / r.seq_len for a in r.active] for r in records], dtype=np.float32)
    if recorder is not None and len(recorder.steps) == len(records):
        rows = recorder.active_map(layer, seq_len)
    else:  # no positions known: mark steps that ran every row, leave the rest unknown
        rows = np.array([[RECOMPUTED if r.active[layer] == seq_len else np.nan] * seq_len for r in records], dtype=np.float32)
    similarity = None
    if any(len(r.similarity) > layer and r.similarity[layer] is not None for r in records):
        similarity = np.full((len(records), seq_len), np.nan, dtype=np.float32)
        for i, r in enumerate(records):
            sim = r.similarity[layer] if len(r.similarity) > layer else None
            if sim is not None:
                similarity[i] = sim[0].float().numpy()
    return SaliencyTrace(fraction, rows, similarity, layer, prompt_length, policy)


def record_saliency(
    model,
    tokenizer,
    prompt: str,
    policy: str = "dual_cache",
    policy_args: Mapping | None = None,
    layer: int | None = None,
    compile: bool = False,
    **gen_params,
) -> SaliencyTrace:
    """Transform ``model`` with ``policy``, generate for one prompt and trace every step.

    Args:
        layer: the layer of the per-position maps (default: the middle layer).
        gen_params: :func:`dyllm_fx.generate` arguments (gen_length, block_length, steps, ...).
    """
    from .generation import generate
    from .policy_setup import VANILLA, apply_policy

    if policy == VANILLA:
        raise ValueError("policy 'vanilla' recomputes every row at every step: there is nothing to plot; pick a transform() policy")
    fast = apply_policy(model, policy, policy_args, compile=compile)
    fast.engine.record_similarity = True  # the policy's layer_similarity, copied to the host each layer
    with RowRecorder(fast.policy) as recorder:
        out = generate(fast, tokenizer, [prompt], progress=False, **gen_params)
    records = list(fast.engine.records)
    n_layers = len(records[0].active) if records else 0
    return trace_from_records(records, recorder, n_layers // 2 if layer is None else layer, out.prompt_length, policy)
