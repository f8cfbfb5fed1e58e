"""ES-dLLM's generation loop written out from the official code (not a test module).

A plain-torch transcription of zhuzj19/ES-dLLM, ``generate.py`` (``batch_generate``,
``sample_tokens_LLaDA``, ``sample_tokens_Dream``), ``early_skipping.py``
(``skip_in_hidden_state``, ``update_hidden_state``, ``get_importance_score``) and
``models/llada_func.py`` (``LLaDALlamaBlock_forward``: score after the layer's MLP, then write
the snapshot), in its ``HiddenState`` mode, batch 1, float32, temperature 0, no CFG, no sparse
K/V. It is written from the official code, not from the project's policy, so that the tests can
compare the two token for token. The model runs through the hand-written block of
``tests/block_reference.py``.

``threshold=None`` is the official one-token-per-step decoding (``token_per_step=1``); a
threshold is its ``parallel_mode`` (``eval.py``, mode ``_p``). ``delay_eos`` is
``delay_eos_generation`` (``True`` in ``eval.py`` and ``config.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from block_reference import arch_modules, logits, mlp, o_proj, project


def _attention(arch, layer, x, rows, pos, k_cache, v_cache):
    """One layer for the rows ``rows`` (1, A): their K/V go into the caches (``update_fetch_kvcache``),
    their queries attend to every cached key; returns the layer's output (1, A, D)."""
    q, k, v = project(arch, layer, x, rows, pos)
    k_cache[layer][:, :, rows[0]] = k
    v_cache[layer][:, :, rows[0]] = v
    ctx = F.scaled_dot_product_attention(
        q, k_cache[layer], v_cache[layer], enable_gqa=q.shape[1] != k_cache[layer].shape[1]
    )
    h_mid = o_proj(arch, layer, x, ctx)
    return h_mid + mlp(arch, layer, h_mid)


def _importance(confidence, absdiff, alpha):
    """``get_importance_score``: alpha * confidence + (1 - alpha) * absdiff, +2 on the top 2."""
    score = confidence * alpha + absdiff * (1 - alpha)
    if alpha > 0.0:
        top2 = confidence.topk(2, dim=-1, largest=True, sorted=False).indices
        score = score + torch.zeros_like(score).scatter_(1, top2, 2.0)
    return score


def _skip(x, rows, snapshot, count, confidence, constant, alpha):
    """``skip_in_hidden_state``: keep the ``count`` most important rows (when fewer than all)."""
    if count is None or count == rows.shape[1]:
        return x, rows
    last = snapshot[:, rows[0]] if snapshot is not None else torch.zeros_like(x)
    norm = last.norm(p=2, dim=-1) / math.sqrt(x.shape[-1]) + 1e-6
    absdiff = (x - last).abs().mean(dim=-1) / norm
    absdiff = absdiff / torch.clamp(absdiff.max(dim=-1, keepdim=True).values, min=1.0)
    score = _importance(confidence[:, rows[0]], absdiff, alpha) + constant[:, rows[0]]
    keep = torch.topk(score, count, dim=-1, largest=True, sorted=False).indices
    return x.take_along_dim(keep[..., None], 1), rows.take_along_dim(keep, 1)


def _forward(arch, ids, rows, pos, caches, snapshots, counts, confidence, constant, alpha):
    """One call of the official model: (logits of the rows that ran every layer, those rows)."""
    k_cache, v_cache = caches
    x = arch["embed"](ids[:, rows[0]])
    for layer in range(len(arch["layers"])):
        x = _attention(arch, layer, x, rows, pos, k_cache, v_cache)
        x, rows = _skip(x, rows, snapshots[layer], counts[layer], confidence, constant, alpha)
        if snapshots[layer] is not None:  # update_hidden_state: every call, whatever was kept
            snapshots[layer][:, rows[0]] = x
    return logits(arch, x), rows


def _sample(logits_, rows, mask_index, confidence, threshold, eos, exist_eos, family):
    """``sample_tokens_LLaDA`` / ``sample_tokens_Dream`` at temperature 0: (tokens, chosen slots)."""
    probs = F.softmax(logits_.float(), dim=-1)
    p, x0 = probs.max(dim=-1)  # Dream's top_p / top_k never remove the top token at temperature 0
    left_masked = mask_index.gather(-1, torch.clamp(rows - 1, min=0))
    delayed = (x0 == eos) & ~exist_eos & left_masked if eos is not None else torch.zeros_like(left_masked)
    if family == "llada":  # zeroed before the scatter: the stored confidence is 0 too
        p[delayed] = 0.0
        p[~mask_index.gather(-1, rows)] = 0.0
        confidence.scatter_(1, rows, p)
    else:  # Dream: zeroed after the scatter, for this step's choice only
        p[~mask_index.gather(-1, rows)] = 0.0
        confidence.scatter_(1, rows, p)
        p[delayed] = 0.0
    if threshold is None:
        return x0, torch.topk(p, k=1, dim=-1).indices[0]
    chosen = p > threshold
    chosen.scatter_(-1, torch.topk(p, k=1, dim=-1).indices, True)
    chosen &= p > 0.0
    return x0, chosen[0].nonzero().squeeze(1)


@torch.no_grad()
def es_dllm_generate(
    model,
    prompt: torch.Tensor,
    gen_length: int,
    block_length: int,
    mask_id: int,
    eos_id: int,
    family: str = "llada",
    threshold: float | None = None,
    delay_eos: bool = True,
    alpha: float = 0.5,
    proportion_steps=((1, 0), (0.5, 0.125), (0.25, 0.25)),
    block_update_freq: int = 16,
    prompt_update_freq: int = 64,
) -> torch.Tensor:
    """The official ES-dLLM loop; returns the response tokens (gen_length,)."""
    arch = arch_modules(model)
    n_layers = len(arch["layers"])
    offset = 1 if family == "dream" else 0  # Dream's logit row p predicts token p + 1
    eos = eos_id if delay_eos else None
    plen = prompt.shape[1]
    max_length = plen + gen_length
    x = F.pad(prompt, (0, gen_length + offset), value=mask_id)
    pos = torch.arange(max_length).unsqueeze(0)
    proportions = [[p for p, s in proportion_steps if i >= s * n_layers][-1] for i in range(n_layers)]
    skip_layers = [proportions[0] != 1] + [proportions[i] != proportions[i - 1] for i in range(1, n_layers)]
    kv_shape = (1, arch["kv_heads"], max_length, arch["head_dim"])
    caches = (
        [torch.zeros(kv_shape) for _ in range(n_layers)],
        [torch.zeros(kv_shape) for _ in range(n_layers)],
    )
    hidden = arch["embed"].weight.shape[1]
    snapshots = [torch.zeros(1, max_length, hidden) if s else None for s in skip_layers]
    confidence = torch.zeros(1, max_length)  # all_confidence
    constant = torch.zeros(1, max_length)  # constant_coefficient
    last_decode_cnt, last_decoded, leftmost_decoded, step_cnt = 0, None, None, 0
    for block in range(gen_length // block_length):
        start = plen + block * block_length - offset
        end = plen + (block + 1) * block_length - offset
        for step in range(block_length):
            if step_cnt == 0:
                fwd_start, fwd_end, all_update = 0, max_length, True
            else:
                fwd_start = start if step != 0 else leftmost_decoded
                if step_cnt % prompt_update_freq == 0:
                    fwd_start = 0
                fwd_end = end
                all_update = step_cnt % block_update_freq == 0 or step_cnt % prompt_update_freq == 0
            window = fwd_end - fwd_start
            floor = min(last_decode_cnt + 2, end - start)
            counts = [None if all_update else max(int(p * window), floor) for p in proportions]
            mask_index = x[:, :max_length] == mask_id
            if offset:
                mask_index[:, :-offset] = mask_index[:, offset:].clone()
            mask_index[:, :start] = False
            mask_index[:, end:] = False
            if mask_index.sum() == 0:
                step_cnt += block_length - step
                break
            if not all_update:
                constant.zero_()
                constant[0, mask_index[0].nonzero()[0].item()] = 5.0
                if last_decoded is not None and alpha < 1.0:
                    constant[0, last_decoded] = 3.0
            rows = torch.arange(fwd_start, fwd_end).unsqueeze(0)
            out, rows = _forward(arch, x, rows, pos, caches, snapshots, counts, confidence, constant, alpha)
            if fwd_start == 0:
                out, rows = out[:, start:end], rows[:, start:end]
            exist_eos = (x[:, plen:] == eos_id).any(dim=-1)
            x0, chosen = _sample(out, rows, mask_index, confidence, threshold, eos, exist_eos, family)
            decoded = rows[0, chosen]
            x[0, decoded + offset] = x0[0, chosen]
            last_decode_cnt = decoded.numel()
            confidence[0, decoded] = 0.0
            leftmost_decoded = int(decoded.min())
            last_decoded = decoded.tolist()
            step_cnt += 1
    return x[0, plen : plen + gen_length]
