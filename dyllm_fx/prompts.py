"""Prompts to token ids, as every generation path feeds them to a model: the chat template when
asked for (Instruct models), then one left-padded batch (the runtime decodes after the prompt's
last column, so ragged prompts are padded on the left)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def encode_prompts(
    tokenizer, prompts: Sequence[str], chat: bool, device: torch.device
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(the texts the model sees, input ids (B, P), attention mask (B, P)) on ``device``."""
    if chat:
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
    texts = list(prompts)
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return texts, enc["input_ids"].to(device), enc["attention_mask"].to(device)
