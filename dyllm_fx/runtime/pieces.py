"""The compiler's step program as functions on row tensors: what a policy's step calls.

``passes.split_pieces`` / ``passes.split_attention`` cut the traced model into graphs that run
on any set of rows (see ``StepProgram``). :class:`Pieces` hides their calling conventions (which
prologue tables each piece takes, whether the query part also returns the mask) behind one
method per operation, all on compact tensors: ``x`` (B, A, D) holds the rows ``rows`` (B, A).

    tables = pieces.prologue(inp)                   embeddings h0 (B, L, D) and the RoPE / mask tables
    h_mid, ctx = pieces.attention(l, x, rows, ...)  writes K/V of ``rows``, attends over every key
    out = pieces.mlp(l, h_mid, rows, tables)        the MLP branch
    q, mask = pieces.query(l, x, rows, tables)      the parts of ``attention`` for layers that run
    k, v = pieces.kv(l, x, rows, tables)              their own attention in between (DyLLM,
    h_mid = pieces.post(l, x, ctx)                    ES-dLLM's query/key/value variations)
    k, v, offset = pieces.keys(l, pro, cache)       the keys / values attention reads: a layer's
                                                    key prefix (an encoder's cache) + the cached rows
    logits = pieces.head(h, positions)              final norm + LM head

The prologue takes the step's extra inputs after the three standard ones (``StepInputs.extras``,
for models such as DiffusionGemma whose step also reads an encoder cache and a
self-conditioning signal).

The pieces are the program's fx graphs: a whole step built from these calls is one traceable
function (``torch.compile`` inlines them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import sum_over_shards
from .cache import StepCache


@dataclass
class Prologue:
    """The prologue's outputs: the first hidden state of every row and the tables by name."""

    h0: torch.Tensor
    tables: list[torch.Tensor]


class Pieces:
    def __init__(self, program):
        self.program = program
        self._prologue = program.prologue
        self._attn = [p.gm for p in program.attn]
        self._mlp = [p.gm for p in program.mlp]
        self._epilogue = program.epilogue.gm
        self._query = [p.query for p in program.attn_parts]
        self._kv = [p.kv for p in program.attn_parts]
        self._post = [p.post for p in program.attn_parts]
        self._prefix = [getattr(p, "prefix", None) for p in program.attn_parts]
        self.group = getattr(program, "tensor_parallel_group", None)
        self.vocab_shard = getattr(program, "vocab_shard", None)  # the head's logits: a slice
        index = {name: i for i, name in enumerate(program.table_names)}
        self._attn_tables = [[index[n] for n in p.tables] for p in program.attn]
        self._mlp_tables = [[index[n] for n in p.tables] for p in program.mlp]

    @property
    def n_layers(self) -> int:
        return len(self._attn)

    def scale(self, layer: int) -> float | None:
        """The attention core's softmax scale (None: 1/sqrt(d))."""
        return self.program.attn_parts[layer].scale

    def mlp_reads_tables(self, layer: int) -> bool:
        """Whether the MLP piece reads per-position tables (then its rows must be real positions)."""
        return bool(self._mlp_tables[layer])

    @property
    def h0_reads_state(self) -> bool:
        """Whether the first hidden state reads extra step inputs (self-conditioning): then every
        row's layer-0 input may move between steps even where its token did not."""
        return getattr(self.program, "h0_reads_state", False)

    def prologue(self, input_ids, attention_mask, position_ids, *extras) -> Prologue:
        h0, *tables = self._prologue(input_ids, attention_mask, position_ids, *extras)
        return Prologue(h0, tables)

    def keys(self, layer: int, pro: Prologue, cache: StepCache):
        """(K, V, offset): the keys and values the attention of ``layer`` reads, (B, KV, P + L, d)
        with the layer's key prefix (P keys that are not rows, e.g. an encoder's cache; P = 0 for
        most models) in front of every cached row, so cached row r is key ``offset + r``."""
        k, v = cache.k[layer], cache.v[layer]
        part = self._prefix[layer] if layer < len(self._prefix) else None
        if part is None:
            return k, v, 0
        tables = self._tables(self._attn_tables[layer], pro)
        k_prefix, v_prefix = part(pro.h0, None, *tables)
        return torch.cat([k_prefix, k], 2), torch.cat([v_prefix, v], 2), k_prefix.shape[2]

    def _tables(self, which: list[int], pro: Prologue) -> list[torch.Tensor]:
        return [pro.tables[i] for i in which]

    def attention(self, layer: int, x, rows, pro: Prologue, cache: StepCache):
        """(h_mid, context (B, H, A, d)) of rows ``rows``; their K/V are written to the cache."""
        tables = self._tables(self._attn_tables[layer], pro)
        return self._attn[layer](x, rows, *tables, cache.k[layer], cache.v[layer])

    def mlp(self, layer: int, h_mid, rows, pro: Prologue):
        return self._mlp[layer](h_mid, rows, *self._tables(self._mlp_tables[layer], pro))

    def layer(self, layer: int, x, rows, pro: Prologue, cache: StepCache):
        """One whole layer on ``rows``: (output, h_mid, context, mlp branch)."""
        h_mid, ctx = self.attention(layer, x, rows, pro, cache)
        branch = self.mlp(layer, h_mid, rows, pro)
        return h_mid + branch, h_mid, ctx, branch

    def query(self, layer: int, x, rows, pro: Prologue):
        """(q (B, H, A, d), the core's mask or None); writes nothing."""
        out = self._query[layer](x, rows, *self._tables(self._attn_tables[layer], pro))
        return (out[0], out[1]) if self.program.attn_parts[layer].has_mask else (out, None)

    def kv(self, layer: int, x, rows, pro: Prologue):
        """(k, v) (B, KV, A, d) of ``rows``; writes nothing."""
        return self._kv[layer](x, rows, *self._tables(self._attn_tables[layer], pro))

    def post(self, layer: int, x, context):
        """o_proj(context) + the residual: the attention half's output h_mid."""
        return self._post[layer](x, context)

    def sum_over_shards(self, tensor):
        """Per-row statistics of this rank's heads summed over a tensor-parallel model's ranks
        (the tensor itself for a model in one process)."""
        return sum_over_shards(tensor, self.group)

    def head(self, hidden, positions):
        """Logits (B, P, V) at ``positions`` (B, P) from hidden states ``hidden`` (B, P, D)."""
        return self._epilogue(hidden, positions)


__all__ = ["Pieces", "Prologue"]
