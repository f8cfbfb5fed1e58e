"""Plain transcriptions of the published reference generation loops (not a test module).

These deliberately follow the structure of the LLaDA ``generate`` (with Fast-dLLM's threshold
variant) and Dream ``_sample`` reference code: one full forward over the *whole* sequence per
step, confidences over the whole sequence, no blocks-as-views, no caches. The tests compare
``dyllm_fx.generate`` against them token for token.

``model`` is any callable ``model(x, attention_mask) -> logits (B, L, V)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# LLaDA (GSAI-ML/LLaDA generate.py) + Fast-dLLM threshold decoding
# --------------------------------------------------------------------------------------------


def llada_gumbel(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand_like(logits, dtype=torch.float64)
    return logits.exp() / (-torch.log(u)) ** temperature


def llada_num_transfer_tokens(block_mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, Lb) bool -> (B, steps): even split, the remainder +1 on the first steps."""
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    out = torch.zeros(mask_num.shape[0], steps, dtype=torch.int64) + base
    for row in range(mask_num.shape[0]):
        out[row, : int(remainder[row])] += 1
    return out


@torch.no_grad()
def llada_generate(
    model,
    prompt: torch.Tensor,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = 126336,
    threshold: float | None = None,
) -> torch.Tensor:
    bsz, plen = prompt.shape
    x = torch.full((bsz, plen + gen_length), mask_id, dtype=torch.long)
    x[:, :plen] = prompt.clone()
    prompt_index = x != mask_id

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    if threshold is None:
        assert steps % num_blocks == 0
        steps_per_block = steps // num_blocks

    for num_block in range(num_blocks):
        block_start = plen + num_block * block_length
        block_end = block_start + block_length
        block_mask_index = x[:, block_start:block_end] == mask_id
        if threshold is None:
            num_transfer_tokens = llada_num_transfer_tokens(block_mask_index, steps_per_block)
        i = 0
        while True:
            if threshold is None and i >= steps_per_block:
                break
            if threshold is not None and not (x[:, block_start:block_end] == mask_id).any():
                break
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = model(torch.cat([x, un_x], dim=0), None)
                logits, un_logits = torch.chunk(both, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, None)

            x0 = torch.argmax(llada_gumbel(logits, temperature), dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]))
            else:
                raise NotImplementedError(remasking)
            x0_p[:, block_end:] = NEG_INF

            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, NEG_INF))

            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                if threshold is None:
                    k = int(num_transfer_tokens[j, i])
                else:
                    # Fast-dLLM: every masked token of the block is a candidate ...
                    k = int(mask_index[j, :block_end].sum())
                if k == 0:
                    continue
                _, select_index = torch.topk(confidence[j], k=k)
                transfer_index[j, select_index] = True
                if threshold is not None:
                    # ... the best one always goes, the others only at or above the threshold.
                    for kk in range(1, k):
                        if confidence[j, select_index[kk]] < threshold:
                            transfer_index[j, select_index[kk]] = False
            x[transfer_index] = x0[transfer_index]
            i += 1
    return x


# --------------------------------------------------------------------------------------------
# Dream (Dream-org/Dream generation_utils.py, _sample)
# --------------------------------------------------------------------------------------------


def dream_top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_remove = cumulative_probs > top_p
    # shift right: keep the first token that crosses the threshold
    sorted_remove[..., 1:] = sorted_remove[..., :-1].clone()
    sorted_remove[..., 0] = False
    remove = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, sorted_remove)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def dream_top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.shape[-1])
    remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def dream_sample_tokens(
    logits, temperature=0.0, top_p=None, top_k=None, margin_confidence=False, neg_entropy=False
):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = dream_top_p_logits(logits, top_p)
    if top_k is not None:
        logits = dream_top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.distributions.Categorical(probs=probs).sample()
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


@torch.no_grad()
def dream_generate(
    model,
    prompt: torch.Tensor,
    steps: int,
    gen_length: int,
    alg: str = "origin",
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    alg_temp: float | None = None,
    eps: float = 1e-3,
    mask_id: int = 151666,
) -> torch.Tensor:
    x = F.pad(prompt, (0, gen_length), value=mask_id)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x, None)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t = timesteps[i]
        s = timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index]) + mask_id
            transfer_index_t_s = torch.rand(*x0.shape) < p_transfer
            _, x0[transfer_index_t_s] = dream_sample_tokens(
                mask_logits[transfer_index_t_s], temperature=temperature, top_p=top_p, top_k=top_k
            )
            x[mask_index] = x0.clone()
            continue
        if alg == "maskgit_plus":
            confidence, x0 = dream_sample_tokens(mask_logits, temperature, top_p, top_k)
        elif alg == "topk_margin":
            confidence, x0 = dream_sample_tokens(
                mask_logits, temperature, top_p, top_k, margin_confidence=True
            )
        elif alg == "entropy":
            confidence, x0 = dream_sample_tokens(mask_logits, temperature, top_p, top_k, neg_entropy=True)
        else:
            raise RuntimeError(f"unknown alg {alg}")
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full_like(x, NEG_INF, dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        if number_transfer_tokens > 0:
            if alg_temp is None or alg_temp == 0:
                _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
            else:
                full_confidence = F.softmax(full_confidence / alg_temp, dim=-1)
                transfer_index = torch.multinomial(full_confidence, num_samples=number_transfer_tokens)
            x_ = torch.zeros_like(x) + mask_id
            x_[mask_index] = x0.clone()
            row_indices = torch.arange(x.shape[0]).unsqueeze(1).expand_as(transfer_index)
            x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x
