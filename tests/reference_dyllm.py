"""DyLLM's generation loop written out from the official code (not a test module).

A plain-torch transcription of younjoo0614/DyLLM (the mirror of scale-snu/DyLLM), batch 1,
float32, temperature 0, eos ignored (``run.py``: ``ignore_eos=True``):

* ``engine/scheduler.py``: the first ``num_full_steps`` steps of a generation run every row
  (not once per block); every later step is sparse.
* ``engine/model_runner.py prepare_sparse``: a sparse step queries the response rows, or the
  whole sequence when ``processed_steps <= 4 or processed_steps % 4 == 0``; layer 0's salient
  rows are the positions the last step committed.
* ``models/llada.py`` / ``layers/attention.py`` / ``csrc/attention/attention_ops_kernels.cu``:
  every queried row gets a query; the salient rows get new K/V (written to the caches), exact
  attention against every key, and the others the cached context + P . dV (P the softmax of
  the query over every key, dV the salient rows' change of V); a row is salient in the next
  layer when the cosine of its new context (all heads at once) to its cached one is below
  ``tau`` (the kernel's ``rsqrt(max(norm^2, 1e-8))``); every queried row's new context replaces
  the cached one; o_proj and the residual run for every queried row, the MLP for the salient
  rows, the others add their cached MLP output (``mlp_cache_manage.py``).
* ``layers/sampler.py``: the masked positions of the current block are the candidates, scored
  by the top probability (``LLaDASampler("confidence")``) or, for Dream, by minus the entropy
  ``sum p log(p + 1e-10)`` (``DreamSampler("entropy")``), whose logits are shifted one row
  down over the queried rows (``adjust_logits``: row 0 keeps its own); the best
  ``max_new_tokens // steps`` are committed, or with a threshold the best one and every one
  scoring at least the threshold (``filter_and_count_kernel``).

The official engine runs in bfloat16 with CUDA kernels; the transcription keeps the method
and runs float32 on the CPU. It is written from the official code, not from the project's
policy, so that the tests can compare the two token for token. The model runs through the
hand-written block of ``tests/block_reference.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from block_reference import arch_modules, logits, mlp, o_proj, project, repeat_kv


class _Caches:
    """Per layer: K, V (1, KV, L, d), the attention context (1, H, L, d) and the MLP output (1, L, D)
    of every row at its last update (the official ``k_cache``, ``v_cache``, ``context_cache``,
    ``MLPcache``)."""

    def __init__(self, arch, length: int):
        n, hd, hidden = len(arch["layers"]), arch["head_dim"], arch["embed"].weight.shape[1]
        self.k = [torch.zeros(1, arch["kv_heads"], length, hd) for _ in range(n)]
        self.v = [torch.zeros(1, arch["kv_heads"], length, hd) for _ in range(n)]
        self.context = [torch.zeros(1, arch["heads"], length, hd) for _ in range(n)]
        self.mlp = [torch.zeros(1, length, hidden) for _ in range(n)]


def _full_forward(arch, ids, pos, caches: _Caches):
    """A full step (``ctx.is_full``): every row, every cache reset; the logits of every row."""
    rows = torch.arange(ids.shape[1]).unsqueeze(0)
    x = arch["embed"](ids)
    for layer in range(len(arch["layers"])):
        q, k, v = project(arch, layer, x, rows, pos)
        caches.k[layer][:], caches.v[layer][:] = k, v
        heads = q.shape[1]
        ctx = F.scaled_dot_product_attention(q, repeat_kv(k, heads), repeat_kv(v, heads))
        caches.context[layer][:] = ctx
        h_mid = o_proj(arch, layer, x, ctx)
        caches.mlp[layer][:] = mlp(arch, layer, h_mid)
        x = h_mid + caches.mlp[layer]
    return logits(arch, x)


def _cosine(new, old):
    """The kernel's cosine of each row's context, all heads at once: (A,)."""
    new, old = new.transpose(0, 1).flatten(1), old.transpose(0, 1).flatten(1)  # (A, H * d)
    dot = (new * old).sum(-1)
    return (
        dot
        * torch.rsqrt(torch.clamp((old * old).sum(-1), min=1e-8))
        * torch.rsqrt(torch.clamp((new * new).sum(-1), min=1e-8))
    )


def _sparse_forward(arch, ids, pos, start, salient, caches: _Caches, tau):
    """A sparse step querying rows ``start ..`` of the sequence, layer 0's salient rows ``salient``
    (absolute positions); the logits of the queried rows."""
    rows = torch.arange(start, ids.shape[1])
    x = arch["embed"](ids[:, rows])
    for layer in range(len(arch["layers"])):
        q = project(arch, layer, x, rows.unsqueeze(0), pos)[0][0]  # (H, A, d) every queried row
        sal = salient.tolist()
        _, k_sal, v_sal = project(arch, layer, x[:, salient - start], salient.unsqueeze(0), pos)
        k_all, v_all = caches.k[layer][0], caches.v[layer][0]  # (KV, L, d), written in place
        dv = torch.zeros_like(v_all)
        dv[:, sal] = v_sal[0] - v_all[:, sal]
        k_all[:, sal], v_all[:, sal] = k_sal[0], v_sal[0]
        heads = q.shape[0]
        keys, values = repeat_kv(k_all[None], heads)[0], repeat_kv(v_all[None], heads)[0]
        p = torch.softmax(q @ keys.transpose(-1, -2) * arch["head_dim"] ** -0.5, dim=-1)  # (H, A, L)
        cached = caches.context[layer][0][:, rows]  # (H, A, d)
        new = cached + p @ repeat_kv(dv[None], heads)[0]  # cached context + P . dV
        new[:, salient - start] = (p @ values)[:, salient - start]  # the salient rows: exact attention
        cos = _cosine(new, cached)
        caches.context[layer][0][:, rows] = new
        h_mid = o_proj(arch, layer, x, new[None])
        salient = rows[cos < tau]  # this layer's MLP and the next layer's K/V
        caches.mlp[layer][0, salient] = mlp(arch, layer, h_mid[:, salient - start])[0]
        x = h_mid + caches.mlp[layer][:, rows]
    return logits(arch, x)


def _scores(logit_rows, family):
    """(score, token) of each candidate row: the top probability, or Dream's minus entropy."""
    probs = torch.softmax(logit_rows.float(), dim=-1)
    top, tokens = probs.max(dim=-1)
    if family == "dream":
        return (probs * torch.log(probs + 1e-10)).sum(-1), tokens
    return top, tokens


def _ranked(values, candidates, length, per_step, threshold, ties):
    """The candidates' indices, best score first. ``ties="sort"``: the official ``torch.sort``
    (equal scores in the order the device's sort leaves them); ``ties="topk"``: equal scores
    broken as ``torch.topk`` over a whole-sequence vector (-inf off the candidates) breaks them,
    and under a threshold the best one as ``argmax`` (the first of equal ones)."""
    ranked = torch.sort(values, descending=True).indices
    if ties == "sort":
        return ranked
    if threshold is not None:
        first = values.argmax().view(1)
        return torch.cat([first, ranked[ranked != first]])
    full = torch.full((length,), -torch.inf)
    full[candidates] = values
    top = torch.topk(full, min(per_step, candidates.numel())).indices
    first = torch.searchsorted(candidates, top)  # candidates ascend: positions -> their indices
    return torch.cat([first, ranked[~torch.isin(ranked, first)]])


@torch.no_grad()
def dyllm_generate(
    model,
    prompt: torch.Tensor,
    gen_length: int,
    block_length: int,
    mask_id: int,
    family: str = "llada",
    tau: float | None = None,
    steps: int | None = None,
    threshold: float | None = None,
    num_full_steps: int = 4,
    full_query_interval: int = 4,
    score: str | None = None,
    first_row_own_logits: bool = True,
    ties: str = "sort",
    trace: dict | None = None,
) -> torch.Tensor:
    """The official DyLLM loop; returns the response tokens (gen_length,). ``tau``: the official
    0.99 (LLaDA, ``Config.threshold``) or 0.995 (Dream, ``run.py``) when None; ``num_full_steps``
    4 (``scripts/run_gsm8k.sh``, ``run.py``). ``score``: the family's sampler score when None
    (``"confidence"`` for LLaDA, ``"entropy"`` for Dream). ``first_row_own_logits=False``: on a
    step that queries the response only, Dream's first response row takes the logits of the last
    prompt row from the last step that queried it instead of its own (the official shift packs
    the queried rows of every sequence into one list, so its row 0 has no row above it).
    ``ties``: how equal scores are ordered (:func:`_ranked`; float32 probabilities of a
    confident model round to exactly 1 at many positions, and the official order among them is
    whatever the GPU's sort leaves). ``trace``, when given, receives the counts of ``steps``,
    ``sparse_steps`` and ``ties`` (steps whose last committed score equals the best one left
    masked, where the order among equal scores decides)."""
    trace = {} if trace is None else trace
    trace.update(steps=0, sparse_steps=0, ties=0)
    arch = arch_modules(model)
    tau = tau if tau is not None else (0.995 if family == "dream" else 0.99)
    score = score or ("entropy" if family == "dream" else "confidence")
    per_step = 1 if threshold is not None else gen_length // (steps or gen_length)
    plen = prompt.shape[1]
    ids = F.pad(prompt, (0, gen_length), value=mask_id)
    length = ids.shape[1]
    pos = torch.arange(length).unsqueeze(0)
    caches = _Caches(arch, length)
    committed = torch.empty(0, dtype=torch.long)
    processed = 0
    while (ids[0, plen:] == mask_id).any() and (threshold is not None or processed < (steps or gen_length)):
        processed += 1
        if processed <= num_full_steps:
            out, start = _full_forward(arch, ids, pos, caches), 0
        else:
            full_query = processed <= full_query_interval or processed % full_query_interval == 0
            start = 0 if full_query else plen
            out = _sparse_forward(arch, ids, pos, start, committed, caches, tau)
        out = out[0]
        if start == 0:
            stale = out  # every row's logits, for first_row_own_logits=False
        if family == "dream":  # adjust_logits: row r takes row r - 1's logits, row 0 its own
            first = out[:1] if first_row_own_logits or start == 0 else stale[start - 1 : start]
            out = torch.cat([first, out[:-1]])
        block = (int((ids[0, plen:] != mask_id).sum()) // block_length) if block_length else 0
        limit = min(length, plen + block_length * (block + 1))
        candidates = (ids[0, :limit] == mask_id).nonzero().squeeze(1)
        values, tokens = _scores(out[candidates - start], "dream" if score == "entropy" else "llada")
        ranked = _ranked(values, candidates, length, per_step, threshold, ties)
        keep = torch.arange(ranked.numel()) < per_step
        if threshold is not None:
            keep |= values[ranked] >= threshold
        n_kept = int(keep.sum())
        if n_kept < ranked.numel() and values[ranked[n_kept - 1]] == values[ranked[n_kept]]:
            trace["ties"] += 1
        trace["steps"] += 1
        trace["sparse_steps"] += int(processed > num_full_steps)
        chosen = ranked[keep]
        committed = candidates[chosen]
        ids[0, committed] = tokens[chosen]
    return ids[0, plen:]
