"""Per-step, per-layer traces of what a transformed model recomputed, for the saliency plot.

With ``record_activity`` on, the engine records per step what each layer did to every row
(1 recomputed, 0.5 attention only, 0 read from the cache) and, for policies that measure it
(DyLLM, with ``record_similarity``), each row's cosine similarity of the attention context to
the previous step's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# Values of the active-rows map: what a position got at a (step, layer).
CACHED, ATTENTION_ONLY, RECOMPUTED = 0.0, 0.5, 1.0


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


def trace_from_records(records, layer: int, prompt_length: int, policy: str) -> SaliencyTrace:
    """Build a :class:`SaliencyTrace` from the engine's StepRecords (batch row 0)."""
    if not records:
        raise ValueError(
            "no step records: run a generation on a transformed model (dyllm_fx.transform) first"
        )
    n_layers, seq_len = len(records[0].active), records[0].seq_len
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range; the model has layers 0..{n_layers - 1}")
    fraction = np.array([[a / r.seq_len for a in r.active] for r in records], dtype=np.float32)
    if all(r.activity is not None for r in records):
        rows = np.stack([r.activity[layer, 0].float().numpy() for r in records])
    else:  # no positions known: mark steps that ran every row, leave the rest unknown
        rows = np.array(
            [[RECOMPUTED if r.active[layer] == seq_len else np.nan] * seq_len for r in records],
            dtype=np.float32,
        )
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
    from ..generation import generate
    from ..policy_setup import VANILLA, apply_policy

    if policy == VANILLA:
        raise ValueError(
            "policy 'vanilla' recomputes every row at every step: there is nothing to plot; pick a "
            "transform() policy"
        )
    fast = apply_policy(model, policy, policy_args, compile=compile)
    fast.engine.record_similarity = True  # copied to the host after every step
    fast.engine.record_activity = True
    # a progress bar on a terminal for a long generation (the tracing copies every step to the host)
    out = generate(fast, tokenizer, [prompt], **{"progress": None, **gen_params})
    records = list(fast.engine.records)
    n_layers = len(records[0].active) if records else 0
    return trace_from_records(records, n_layers // 2 if layer is None else layer, out.prompt_length, policy)
