"""Execute a piecewise step program on the active rows, with caches.

One call = one denoising step:

    h0, tables = prologue(input_ids, mask, positions)         # embeddings + RoPE tables, all rows
    hidden[0] = h0
    for each layer l:
        rows = policy.rows(l)                                   # padded to a bucket
        h_mid, ctx = attn[l](hidden[l][rows], rows, tables, K[l], V[l])   # writes K/V rows
        sub = policy.after_attention(l, rows, ctx)              # rows that get the MLP
        hidden[l + 1][rows] = h_mid + mlp[l](h_mid)             # (cached MLP output off `sub`)
        policy.after_block(l, rows, hidden[l + 1][rows])
    logits = epilogue(hidden[n][positions])                     # LM head where the sampler reads

Row counts are padded to buckets (powers of two, capped at the sequence length) by repeating
a row, so each piece sees a handful of shapes and compiled graphs are reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dyllm_fx.kernels.eager import cache_write_rows, gather_rows

from .approx_layer import run_approx_layer
from .cache import StepCache
from .cuda_graph import StepGraphs
from .policies import Policy, StepState
from .rows import bucket_size, pad_rows  # noqa: F401 (bucket_size: part of this module's API)


@dataclass(frozen=True)
class AttentionCalls:
    """One layer's split attention (``passes.split_attention``), as the engine calls it."""

    query: Callable
    kv: Callable
    post: Callable
    scale: float | None
    has_mask: bool


@dataclass
class StepRecord:
    """What one step computed: active rows per layer (before bucket padding) and, for
    policies that measure it, each layer's per-position cosine similarity of the attention
    context to the previous step's ((B, L) fp32 on the CPU, NaN where not measured; None for
    layers or policies that measure nothing)."""

    active: list[int] = field(default_factory=list)
    seq_len: int = 0
    similarity: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def active_fraction(self) -> float:
        return sum(self.active) / (len(self.active) * self.seq_len) if self.active else 0.0


class SparseStepEngine:
    """Owns the pieces (eager or compiled), the cache and the policy."""

    def __init__(self, program, policy: Policy, compile_fn: Callable | None = None):
        self.program = program
        self.policy = policy
        wrap = compile_fn or (lambda m: m)
        self.prologue = wrap(program.prologue)
        self.attn = [wrap(p.gm) for p in program.attn]
        self.mlp = [wrap(p.gm) for p in program.mlp]
        self.epilogue = wrap(program.epilogue.gm)
        # The attention pieces cut at their core (query, kv, post), for DyLLM-style layers.
        self.parts = [AttentionCalls(wrap(p.query), wrap(p.kv), wrap(p.post), p.scale, p.has_mask) for p in program.attn_parts]
        self.table_index = {name: i for i, name in enumerate(program.table_names)}
        self.cache: StepCache | None = None
        self.records: list[StepRecord] = []
        self.mlp_cache: list[torch.Tensor] | None = None
        # DyLLM layers: per layer the context (B, H, L, d) and softmax statistics (m, l) (B, H, L)
        # of every row, and whether the statistics are current (not after a full layer).
        self.context_cache: list[torch.Tensor] | None = None
        self.softmax_stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.attn_out_cache: list[torch.Tensor] = []
        self.stats_valid: list[bool] = []
        # Off by default: copying similarities to the host each layer costs a sync.
        self.record_similarity = False
        self.mask_token_id: int | None = None  # set by TransformedModel from the diffusion spec
        # CUDA-graph replay of warm steps of layer-uniform policies (runtime/cuda_graph.py).
        self.cuda_graphs = False
        self.graphs = StepGraphs(self._uniform_step)

    @property
    def n_layers(self) -> int:
        return len(self.attn)

    def predicted_nbytes(self, batch: int, seq_len: int) -> int:
        """Bytes the caches of a (batch, seq_len) generation take under the current policy."""
        prog = self.program
        total = StepCache.predicted_nbytes(prog, batch, seq_len)
        h_item = torch.empty((), dtype=prog.hidden_dtype).element_size()
        if self.policy.needs_mlp_cache:
            total += self.n_layers * batch * seq_len * prog.hidden_size * h_item
        if self.policy.approximate:
            kv_item = torch.empty((), dtype=prog.kv_dtype).element_size()
            for heads, (_, v) in zip(prog.attn_heads, prog.kv_shapes):
                total += batch * heads * seq_len * (v[1] * kv_item + 2 * 4)  # context + fp32 (m, l)
            total += self.n_layers * batch * seq_len * prog.hidden_size * h_item  # o_proj(context)
        return total

    @property
    def allocated_nbytes(self) -> int:
        if self.cache is None:
            return 0
        extra = [
            *(self.mlp_cache or []), *(self.context_cache or []), *(t for ml in self.softmax_stats for t in ml),
            *self.attn_out_cache,
        ]
        return self.cache.nbytes + sum(t.numel() * t.element_size() for t in extra)

    def reset(self) -> None:
        """Forget cached rows (the next step recomputes everything); keeps the buffers."""
        if self.cache is not None:
            self.cache.warm = False
        self.records = []

    def _ensure_cache(self, batch: int, seq_len: int, device: torch.device) -> StepCache:
        if self.cache is None or not self.cache.fits(batch, seq_len, device):
            # Normal tensors even when called under inference_mode (generate() is): inference
            # tensors could not be written by a later call made outside it.
            with torch.inference_mode(False):
                self.cache = StepCache.allocate(self.program, batch, seq_len, device)
                self.mlp_cache = None
                self.context_cache = None
                self.softmax_stats, self.attn_out_cache = [], []
                self.graphs.clear()  # the captured graphs point at the old buffers
        # Per-policy buffers: a policy object may be swapped between generations.
        with torch.inference_mode(False):
            if self.policy.needs_mlp_cache and self.mlp_cache is None:
                self.mlp_cache = [torch.zeros_like(h) for h in self.cache.hidden[1:]]
            if self.policy.approximate and self.context_cache is None:
                heads = self.program.attn_heads
                self.context_cache = [
                    torch.zeros(batch, heads[i], seq_len, v[1], dtype=self.program.kv_dtype, device=device)
                    for i, (_, v) in enumerate(self.program.kv_shapes)
                ]
                self.softmax_stats = [
                    (torch.zeros(batch, h, seq_len, device=device), torch.zeros(batch, h, seq_len, device=device))
                    for h in heads
                ]
                self.stats_valid = [False] * len(heads)
                # The attention branch's output o_proj(context) per row: a layer whose K/V did not
                # change at all reuses it (runtime/approx_layer.py).
                self.attn_out_cache = [torch.zeros_like(h) for h in self.cache.hidden[1:]]
        return self.cache

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        logit_positions: torch.Tensor | None,
        nfe: int = 0,
        block: tuple[int, int] | None = None,
        response_start: int | None = None,
    ) -> torch.Tensor:
        """Run one step; returns logits at ``logit_positions`` (B, P) (all positions if None)."""
        bsz, seq_len = input_ids.shape
        cache = self._ensure_cache(bsz, seq_len, input_ids.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cold = not cache.warm
        state = StepState(
            input_ids, attention_mask, nfe, *(block or (None, None)), cold,
            response_start=response_start, cache=cache, kv_probe=None, mask_token_id=self.mask_token_id,
        )
        tables: list[torch.Tensor] = []  # filled by the prologue below, before any policy probes them
        state.kv_probe = lambda layer, rows: self._kv_probe(layer, rows, tables, cache)
        state.q_probe = lambda layer, rows: self._q_probe(layer, rows, tables, cache)
        # Any failure below leaves the cache half-written: mark it cold until a step completes.
        cache.warm = False
        self.policy.begin_step(state)
        all_rows = torch.arange(seq_len, device=input_ids.device).expand(bsz, -1)
        if logit_positions is None:
            logit_positions = all_rows
        record = StepRecord(seq_len=seq_len)
        if not cold and self.cuda_graphs and self.policy.layer_uniform and input_ids.is_cuda:
            rows = self.policy.rows(0, state)
            rows = all_rows if rows is None else rows
            record.active = [int(rows.shape[1])] * self.n_layers
            record.similarity = [None] * self.n_layers
            logits = self.graphs.run(input_ids, attention_mask, position_ids, pad_rows(rows, seq_len), logit_positions)
            cache.warm = True
            self.records.append(record)
            return logits
        h0, *prologue_tables = self.prologue(input_ids, attention_mask, position_ids)
        tables.extend(prologue_tables)
        cache.hidden[0].copy_(h0)
        for layer in range(self.n_layers):
            plan = None if cold else self.policy.approx_layer(layer, state) if self.policy.approximate else None
            if plan is not None:
                record.active.append(run_approx_layer(self, layer, plan, tables, cache))
            else:
                rows = None if cold else self.policy.rows(layer, state)
                rows = all_rows if rows is None else rows
                record.active.append(int(rows.shape[1]))
                if rows.shape[1]:  # an empty row set: the layer keeps every cached output
                    self._layer(layer, pad_rows(rows, seq_len), tables, cache)
            record.similarity.append(self.policy.layer_similarity(layer) if self.record_similarity else None)
        cache.warm = True
        self.records.append(record)
        logits = self.epilogue(gather_rows(cache.hidden[-1], logit_positions, 1), logit_positions)
        self.policy.after_logits(logit_positions, logits)
        return logits

    def _uniform_step(self, input_ids, attention_mask, position_ids, rows, logit_positions) -> torch.Tensor:
        """A warm step where every layer recomputes ``rows`` (padded): what ``graphs`` captures."""
        cache = self.cache
        h0, *tables = self.prologue(input_ids, attention_mask, position_ids)
        cache.hidden[0].copy_(h0)
        for layer in range(self.n_layers):
            self._layer(layer, rows, tables, cache)
        return self.epilogue(gather_rows(cache.hidden[-1], logit_positions, 1), logit_positions)

    def _piece_tables(self, names: list[str], tables: list[torch.Tensor]) -> list[torch.Tensor]:
        return [tables[self.table_index[name]] for name in names]

    def _probe(self, part: str, layer: int, rows: torch.Tensor, tables, cache: StepCache):
        """One split-attention part (``query`` or ``kv``) on ``rows``' current input to ``layer``;
        writes nothing."""
        x = gather_rows(cache.hidden[layer], rows, 1)
        return getattr(self.parts[layer], part)(x, rows, *self._piece_tables(self.program.attn[layer].tables, tables))

    def _q_probe(self, layer: int, rows: torch.Tensor, tables, cache: StepCache) -> torch.Tensor:
        """Queries (B, H, A, d) of ``rows`` (the query part also returns the mask when it has one)."""
        out = self._probe("query", layer, rows, tables, cache)
        return out[0] if self.parts[layer].has_mask else out

    def _kv_probe(self, layer: int, rows: torch.Tensor, tables, cache: StepCache):
        """K, V of ``rows``."""
        return self._probe("kv", layer, rows, tables, cache)

    def _layer(self, layer: int, rows: torch.Tensor, tables: list[torch.Tensor], cache: StepCache) -> None:
        piece = self.program.attn[layer]
        x = gather_rows(cache.hidden[layer], rows, 1)
        piece_tables = self._piece_tables(piece.tables, tables)
        h_mid, context = self.attn[layer](x, rows, *piece_tables, cache.k[layer], cache.v[layer])
        if self.context_cache is not None:
            cache_write_rows(self.context_cache[layer], rows, context, 2)
            cache_write_rows(self.attn_out_cache[layer], rows, h_mid - x, 1)
            self.stats_valid[layer] = False  # this path computes no softmax statistics
        subset = self.policy.after_attention(layer, rows, context)
        if subset is None:
            branch = self.mlp[layer](h_mid, rows)
            if self.mlp_cache is not None:
                cache_write_rows(self.mlp_cache[layer], rows, branch, 1)
        else:
            # Rows off the subset keep the MLP output cached when they last ran it.
            branch = gather_rows(self.mlp_cache[layer], rows, 1)
            sub_rows = rows.gather(1, subset)
            fresh = self.mlp[layer](gather_rows(h_mid, subset, 1), sub_rows)
            cache_write_rows(self.mlp_cache[layer], sub_rows, fresh, 1)
            cache_write_rows(branch, subset, fresh, 1)  # branch is a gathered copy: safe to update
        out = h_mid + branch
        cache_write_rows(cache.hidden[layer + 1], rows, out, 1)
        self.policy.after_block(layer, rows, out)
