"""Pass 4: turn each attention piece's core into a cache-backed partial attention.

    sdpa(q, k, v, mask)          # all rows
becomes
    cache_write_rows(k_cache, rows, k, 2)   # the active rows' new K/V into the cache
    cache_write_rows(v_cache, rows, v, 2)
    partial_attention(q, k_cache, v_cache, rows, mask, scale)   # active queries, all keys

The caches become two new placeholders of the piece (``k_cache``, ``v_cache``), owned by the
runtime's StepCache, one pair per layer. The two calls are ``dyllm_fx.kernels.ops``'s
functions: the ``dyllm::`` op (Triton) for CUDA tensors, plain torch otherwise (see there).
"""

from __future__ import annotations

from dyllm_fx.kernels import ops

from .ops import SDPA, is_op
from .split_pieces import Piece, PieceError


def rewrite_attention(piece: Piece) -> Piece:
    g = piece.gm.graph
    cores = [n for n in g.nodes if is_op(n, SDPA)]
    if len(cores) != 1:
        raise PieceError(f"{piece.gm.__class__.__name__}: expected one attention core, found {len(cores)}")
    core = cores[0]
    args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), core.args))
    args.update(core.kwargs)
    if args.get("is_causal"):
        raise PieceError(f"attention node '{core.name}' is causal; dyllm-fx rewrites bidirectional (diffusion) models only")
    if args.get("dropout_p", 0.0):
        raise PieceError(f"attention node '{core.name}' uses dropout; call model.eval() before transforming")
    rows = next(n for n in g.nodes if n.op == "placeholder" and n.name == "rows")
    last_placeholder = [n for n in g.nodes if n.op == "placeholder"][-1]
    with g.inserting_after(last_placeholder):
        v_cache = g.placeholder("v_cache")
    with g.inserting_after(last_placeholder):
        k_cache = g.placeholder("k_cache")
    with g.inserting_before(core):
        g.call_function(ops.cache_write_rows, (k_cache, rows, args["key"], 2))
        g.call_function(ops.cache_write_rows, (v_cache, rows, args["value"], 2))
        attn = g.call_function(
            ops.partial_attention, (args["query"], k_cache, v_cache, rows, args.get("attn_mask"), args.get("scale"))
        )
    attn.meta = dict(core.meta)
    core.replace_all_uses_with(attn)
    g.erase_node(core)
    g.lint()
    piece.gm.recompile()
    piece.replaced[core.name] = "cache_write_rows (K, V) + partial_attention"
    return piece
