"""Controlled row patterns for step benchmarks (not a benchmark itself).

What a step costs depends on how many rows it recomputes; a random-weight model at 8B shapes
marks a meaningless number of rows salient. These policies fix the number instead:

* :class:`RandomRows`: the same random response rows at every layer (the row-sparse path that
  the block caches, ES-dLLM and dLLM-Cache all run);
* :func:`controlled_dyllm`: DyLLM layers whose salient set is exactly ``n`` rows per layer (a
  top-n capacity with a tau just below 1, so more than n rows qualify; the surplus is overflow,
  approximated and not re-run, which is what makes the count exact), and :func:`changed_tokens`
  gives the step ``n`` changed tokens at layer 0;
* :func:`controlled_es_dllm`: ES-dLLM keeping a fraction of the window after the first eighth
  of the layers.

:func:`llada8b_layer_model` is the model these run on: LLaDA-8B's layer scaled down.
"""

from __future__ import annotations

import torch

from dyllm_fx.models import LLaDAConfig, LLaDAModelLM
from dyllm_fx.runtime.policies import DyLLMPolicy, ESDLLMPolicy, HostState, UniformPolicy

# LLaDA-8B's layer: heads of 128 (32 of them at d_model 4096), the MLP 3x d_model (12288)
HEAD_DIM = 128
MLP_RATIO = 3


def llada8b_layer_model(
    d_model: int, n_layers: int, vocab: int, mask_token_id: int, max_seq: int = 1024, seed: int = 0
) -> LLaDAModelLM:
    """LLaDA-8B's layer at ``d_model`` (d_model / 128 heads of 128, MLP 3 * d_model, its rope
    base), ``n_layers`` of them, random weights (normal, std 0.02; norms 1), float32, eval mode."""
    if d_model % HEAD_DIM:
        raise ValueError(f"d_model must be a multiple of the head size {HEAD_DIM}; got {d_model}")
    heads = d_model // HEAD_DIM
    cfg = LLaDAConfig(
        d_model=d_model,
        n_heads=heads,
        n_kv_heads=heads,
        n_layers=n_layers,
        mlp_hidden_size=MLP_RATIO * d_model,
        vocab_size=vocab,
        embedding_size=vocab,
        max_sequence_length=max_seq,
        rope_theta=500000.0,
        mask_token_id=mask_token_id,
    )
    torch.manual_seed(seed)
    model = LLaDAModelLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model.eval()


class RandomRows(UniformPolicy):
    """The same ``n`` random response rows at every layer of every warm step."""

    name = "rows"

    def __init__(self, n: int, seq: int, response: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.index = (seq - response + torch.randperm(response, generator=g)[:n]).sort().values

    def rows(self, host: HostState) -> torch.Tensor:
        return self.index.to(host.device).expand(host.batch, -1)


def controlled_dyllm(n: int, scope: str = "response") -> DyLLMPolicy:
    """DyLLM with exactly ``n`` salient rows per layer after one dense step (the official
    schedule otherwise: response queried, the whole sequence every 4th step)."""
    return DyLLMPolicy(tau=1.0 - 1e-6, num_full_steps=1, capacity=n, scope=scope, overflow="approximate")


def controlled_es_dllm(fraction: float, n_layers: int, scope: str = "block") -> ESDLLMPolicy:
    """ES-dLLM keeping ``fraction`` of the window from layer n_layers / 8 on, no refreshes."""
    return ESDLLMPolicy(
        skip_layers=(max(1, n_layers // 8),),
        keep=fraction,
        block_update_freq=10**9,
        prompt_update_freq=10**9,
        scope=scope,
    )


def changed_tokens(ids: torch.Tensor, start: int, end: int, n: int, step: int, vocab: int) -> torch.Tensor:
    """``ids`` with ``n`` positions of [start, end) set to new tokens (different every step), so
    a DyLLM step sees ``n`` changed rows at layer 0."""
    out = ids.clone()
    g = torch.Generator().manual_seed(1000 + step)
    cols = start + torch.randperm(end - start, generator=g)[:n]
    out[:, cols.to(ids.device)] = torch.randint(3, vocab, (ids.shape[0], n), generator=g).to(ids.device)
    return out
