"""One DyLLM-style layer on the sparse step's caches (arXiv 2603.08026).

For the queried rows Q = [start, end) and the changed rows C (the rows whose input to this
layer was recomputed: the previous layer's salient set, or at layer 0 the tokens that changed):

    q      = query(h[Q])                       queries of every queried row
    k, v   = kv(h[C])                          K/V of the changed rows only, written to the cache
    exact  = attention(q[C], K, V)             exact context (and softmax stats) of the changed rows
    ctx    = cached_ctx[Q] + P[:, C] . dV      every other row, corrected by the value change
                                               (one dyllm::approx_attention call, which also
                                               returns the cosine statistics; its normalizer
                                               comes from the cached softmax statistics updated
                                               over the changed keys, O(N A d), except on the
                                               first approximate step after a refresh, which
                                               runs the full score pass)
    S      = policy.approx_salient(cos(ctx, cached_ctx))   this layer's salient rows
    h_mid  = post(h[Q], ctx)                   o_proj + residual for every queried row
    mlp[S] recomputed, the other rows reuse their cached MLP output
    h[l+1][Q] = h_mid + mlp

Rows outside [start, end) are not touched (their caches stay as the last full step left them).
"""

from __future__ import annotations

import torch

from dyllm_fx.kernels.eager import approx_attention, cache_write_rows, gather_rows, partial_attention_stats
from dyllm_fx.kernels.saliency import cosine_from_stats

from .rows import flat_row_set, pad_row_set


def run_approx_layer(engine, layer: int, plan, tables, cache) -> int:
    """Run ``layer`` approximately per ``plan`` = (start, end, changed); returns the number of
    rows whose MLP ran (the layer's active count for the step record)."""
    start, end, changed = plan
    parts = engine.parts[layer]
    piece_tables = engine._piece_tables(engine.program.attn[layer].tables, tables)
    k_cache, v_cache, ctx_cache = cache.k[layer], cache.v[layer], engine.context_cache[layer]
    bsz, seq_len = cache.batch, cache.seq_len

    x_q = cache.hidden[layer][:, start:end]
    attn_out = engine.attn_out_cache[layer]
    if changed.shape[1] == 0:
        # No K/V changed: P[:, changed] . dV is empty, so every context equals its cached value
        # (cosine 1, nothing salient) and o_proj(context) equals its cached value too. The layer
        # reduces to the residual adds; the result is the same as the full path's.
        cache.hidden[layer + 1][:, start:end] = x_q + attn_out[:, start:end] + engine.mlp_cache[layer][:, start:end]
        engine.policy.approx_salient(layer, x_q.new_ones(x_q.shape[:2], dtype=torch.float32), start)
        return 0
    q_rows = torch.arange(start, end, device=k_cache.device).expand(bsz, -1)
    q_out = parts.query(x_q, q_rows, *piece_tables)
    q, mask = (q_out[0], q_out[1]) if parts.has_mask else (q_out, None)
    cached_ctx = ctx_cache[:, :, start:end]

    crow = pad_row_set(changed, start, seq_len)
    k_new, v_new = parts.kv(gather_rows(cache.hidden[layer], crow, 1), crow, *piece_tables)
    k_old = gather_rows(k_cache, crow, 2)
    dv = v_new - gather_rows(v_cache, crow, 2)
    cache_write_rows(k_cache, crow, k_new, 2)
    cache_write_rows(v_cache, crow, v_new, 2)
    exact, m_exact, l_exact = partial_attention_stats(
        gather_rows(q, crow - start, 2), k_cache, v_cache, crow, mask, parts.scale
    )
    m_cache, l_cache = engine.softmax_stats[layer]
    # Mode 2 (score pass over the changed keys only) once this layer holds softmax statistics
    # from an earlier approximate step; mode 1 (full score pass) right after a refresh.
    cached_stats = (k_old, m_cache[:, :, start:end], l_cache[:, :, start:end]) if engine.stats_valid[layer] else ()
    ctx, stats, m, l = approx_attention(
        q, k_cache, crow, dv, cached_ctx, crow, exact, mask, parts.scale, *cached_stats, q_start=start
    )
    cos = cosine_from_stats(stats[..., 0], stats[..., 1], stats[..., 2])
    ctx_cache[:, :, start:end] = ctx
    m_cache[:, :, start:end] = m
    l_cache[:, :, start:end] = l
    # The changed rows' statistics are exact (their own attention pass), not the update's.
    cache_write_rows(m_cache, crow, m_exact, 2)
    cache_write_rows(l_cache, crow, l_exact, 2)
    engine.stats_valid[layer] = engine.policy.cached_softmax_stats

    h_mid = parts.post(x_q, ctx)
    attn_out[:, start:end] = h_mid - x_q
    salient = engine.policy.approx_salient(layer, cos, start)
    mlp_cache = engine.mlp_cache[layer]
    if salient.shape[1]:
        if engine.program.mlp[layer].tables:  # an MLP that reads per-position tables keeps (B, S)
            srow = pad_row_set(salient, start, seq_len)
            fresh = engine.mlp[layer](gather_rows(h_mid, srow - start, 1), srow)
            cache_write_rows(mlp_cache, srow, fresh, 1)
        else:
            _row_wise_mlp(engine.mlp[layer], h_mid, salient, start, mlp_cache)
    cache.hidden[layer + 1][:, start:end] = h_mid + mlp_cache[:, start:end]
    return int((salient >= 0).sum(1).max()) if salient.numel() else 0


def _row_wise_mlp(mlp, h_mid: torch.Tensor, salient: torch.Tensor, start: int, mlp_cache: torch.Tensor) -> None:
    """The MLP of the salient rows of every batch element as one flat (1, T) row set.

    Salient counts differ a lot between the elements of a batch; a (B, S) set pads each
    element to the largest count, a flat one runs each salient row once (padded to a bucket).
    Only for MLPs that read no per-position table, so that a row needs nothing but its input.
    """
    batch, pos = flat_row_set(salient, h_mid.shape[0] * mlp_cache.shape[1])
    if batch.numel() == 0:
        return
    fresh = mlp(h_mid[batch, pos - start][None], pos[None])[0]
    mlp_cache.index_put_((batch, pos), fresh)
