"""encode_prompts: the one place prompts become a left-padded batch of ids."""

from __future__ import annotations

import torch

from dyllm_fx.loading import default_model_path, load_tokenizer
from dyllm_fx.prompts import encode_prompts


def test_ragged_prompts_are_left_padded():
    tok = load_tokenizer(default_model_path())
    texts, ids, mask = encode_prompts(tok, ["copy:ab=", "copy:abcd="], chat=False, device=torch.device("cpu"))
    assert texts == ["copy:ab=", "copy:abcd="]
    assert ids.shape == mask.shape == (2, len(tok("copy:abcd=")["input_ids"]))
    assert mask[0].tolist() == [0, 0] + [1] * (ids.shape[1] - 2)  # two pads, on the left
    assert bool(mask[1].all())
    assert ids[0, 2:].tolist() == tok("copy:ab=", add_special_tokens=False)["input_ids"]


class _ChatTokenizer:
    """Records the template calls and delegates the encoding to a real tokenizer."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        self.calls.append((messages, add_generation_prompt, tokenize))
        return "q:" + messages[0]["content"]

    def __call__(self, *args, **kwargs):
        self.inner.padding_side = self.padding_side
        return self.inner(*args, **kwargs)


def test_chat_wraps_each_prompt_in_the_template():
    tok = _ChatTokenizer(load_tokenizer(default_model_path()))
    texts, ids, _ = encode_prompts(tok, ["ab"], chat=True, device=torch.device("cpu"))
    assert texts == ["q:ab"]
    assert tok.calls == [([{"role": "user", "content": "ab"}], True, False)]
    assert ids[0].tolist() == tok.inner("q:ab", add_special_tokens=False)["input_ids"]
