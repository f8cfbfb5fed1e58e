"""A character-level Hugging Face tokenizer for the embedded model.

Saved as a standard ``tokenizer.json`` + ``tokenizer_config.json``, so ``AutoTokenizer``
loads it from the folder like any other checkpoint's tokenizer.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mdm_mask|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN, UNK_TOKEN)


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """One token per character of ``alphabet`` after the special tokens (EOS = pad = id 0)."""
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("alphabet has repeated characters")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
    )


def alphabet(tokenizer) -> str | None:
    """The characters of a character-level tokenizer (every regular token one character), in id
    order; None for subword tokenizers."""
    special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    vocab = tokenizer.get_vocab()
    regular = [(i, tok) for tok, i in vocab.items() if tok not in special]
    if not regular or len(vocab) > 1024 or any(len(tok) != 1 for _, tok in regular):
        return None
    return "".join(tok for _, tok in sorted(regular))


def unknown_characters_message(tokenizer, prompts: list[str], input_ids) -> str | None:
    """A warning text naming the characters of ``prompts`` that became the unknown token (and,
    for a character-level tokenizer, its alphabet), or None when every character is known.
    ``input_ids`` are the already tokenized prompts (a (B, L) tensor or lists)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    rows = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    hit = [b for b, row in enumerate(rows) if unk in row]
    if not hit:
        return None
    found: dict[str, None] = {}
    for b in hit:
        for ch in _unknown_spans(tokenizer, prompts[b], unk):
            found.setdefault(ch, None)
    shown = ", ".join(repr(ch) for ch in list(found)[:20]) or "some characters"
    message = (
        f"prompt(s) {hit} hold characters the tokenizer does not know: {shown}; each becomes "
        f"{tokenizer.unk_token}, which carries no meaning for the model"
    )
    chars = alphabet(tokenizer)
    if chars is not None:
        message += f". The tokenizer's alphabet is {chars!r}; write the prompt with those characters only"
    return message


def _unknown_spans(tokenizer, text: str, unk: int) -> list[str]:
    """The pieces of ``text`` that became ``unk`` (offsets of a fast tokenizer; else per character)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [text[s:e] for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if t == unk and e > s]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        return [
            ch for ch in dict.fromkeys(text) if tokenizer(ch, add_special_tokens=False)["input_ids"] == [unk]
        ]
