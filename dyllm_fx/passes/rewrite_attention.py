"""Pass 6 of 6: turn each attention piece's core into a cache-backed partial attention.

    sdpa(q, k, v, mask)          # all rows
becomes
    cache_write_rows(k_cache, rows, k, 2)   # the active rows' new K/V into the cache
    cache_write_rows(v_cache, rows, v, 2)
    partial_attention(q, k_cache, v_cache, rows, mask, scale)   # active queries, all keys

The caches become two new placeholders of the piece (``k_cache``, ``v_cache``), owned by the
runtime's StepCache, one pair per layer.

A core over a key prefix (``passes/attention_operands.py``: an encoder's K/V in front of the
rows' keys) keeps its concatenation; the cache takes the place of the rows' new keys in it:

    cache_write_rows(k_cache, rows, k_new, 2)
    partial_attention(q, repeat(cat([k_prefix, k_cache])), repeat(cat([v_prefix, v_cache])), rows, mask,
    scale)

so the cache holds the rows (before any GQA head repeat) and the attention reads what the
original core read. The two calls are ``dyllm_fx.kernels.dispatch``'s
functions: the ``dyllm::`` op (Triton) for CUDA tensors, plain torch otherwise (see there).
"""

from __future__ import annotations

from dyllm_fx.kernels import dispatch

from .attention_operands import core_args, piece_operands
from .matching import SDPA, is_op
from .split_pieces import Piece, PieceError


def rewrite_attention(piece: Piece) -> Piece:
    g = piece.gm.graph
    cores = [n for n in g.nodes if is_op(n, SDPA)]
    if len(cores) != 1:
        raise PieceError(f"{piece.gm.__class__.__name__}: expected one attention core, found {len(cores)}")
    core = cores[0]
    args = core_args(core)
    operands = piece_operands(g)
    if args.get("is_causal"):
        raise PieceError(
            f"attention node '{core.name}' is causal; dyllm-fx rewrites bidirectional (diffusion) models only"
        )
    if args.get("dropout_p", 0.0):
        raise PieceError(f"attention node '{core.name}' uses dropout; call model.eval() before transforming")
    rows = next(n for n in g.nodes if n.op == "placeholder" and n.name == "rows")
    last_placeholder = [n for n in g.nodes if n.op == "placeholder"][-1]
    with g.inserting_after(last_placeholder):
        v_cache = g.placeholder("v_cache")
    with g.inserting_after(last_placeholder):
        k_cache = g.placeholder("k_cache")
    if operands.has_prefix:
        k_cat, v_cat = operands.k_cat, operands.v_cat
        with g.inserting_before(k_cat):
            g.call_function(dispatch.cache_write_rows, (k_cache, rows, operands.k_new, 2))
        with g.inserting_before(v_cat):
            g.call_function(dispatch.cache_write_rows, (v_cache, rows, operands.v_new, 2))
        k_cat.replace_input_with(operands.k_new, k_cache)
        v_cat.replace_input_with(operands.v_new, v_cache)
        keys, values = args["key"], args["value"]
    else:
        with g.inserting_before(core):
            g.call_function(dispatch.cache_write_rows, (k_cache, rows, args["key"], 2))
            g.call_function(dispatch.cache_write_rows, (v_cache, rows, args["value"], 2))
        keys, values = k_cache, v_cache
    with g.inserting_before(core):
        attn = g.call_function(
            dispatch.partial_attention,
            (args["query"], keys, values, rows, args.get("attn_mask"), args.get("scale")),
        )
    attn.meta = dict(core.meta)
    core.replace_all_uses_with(attn)
    g.erase_node(core)
    g.lint()
    piece.gm.recompile()
    piece.replaced[core.name] = "cache_write_rows (K, V) + partial_attention"
    return piece
