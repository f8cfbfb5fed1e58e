"""Chat messages to a prompt: the tokenizer's chat template, or a trivial one.

A tokenizer with a ``chat_template`` (LLaDA-Instruct, Dream-Instruct) renders the messages with
it, with the generation prompt added (``apply_chat_template(..., add_generation_prompt=True)``).

A tokenizer without one, such as the embedded model's character-level tokenizer, gets the
**trivial template**: the messages' contents concatenated in order, with no role markers and
nothing in between. A conversation of one user message ``"shift:abc...="`` is the prompt
``"shift:abc...="``, which is what the embedded model was trained to answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def message_text(content) -> str:
    """An OpenAI message ``content``: a string, None, or a list of parts (``{"type": "text",
    "text": ...}``; other part types are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text message parts are supported, got {part!r:.80}")
            texts.append(part["text"])
        return "".join(texts)
    raise TypeError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def normalise_messages(messages) -> list[dict]:
    """``[{"role": ..., "content": str}, ...]`` from dicts (or objects with role / content)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, Mapping) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, Mapping) else getattr(m, "content", None)
        if not isinstance(role, str) or not role:
            raise ValueError(
                f"message {i} has no role; each message needs 'role' (system, user, assistant) and 'content'"
            )
        out.append({"role": role, "content": message_text(content)})
    return out


def render_chat(tokenizer, messages) -> str:
    """The prompt for ``messages`` (see the module docstring for the two templates)."""
    msgs = normalise_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return "".join(m["content"] for m in msgs)


__all__ = ["message_text", "normalise_messages", "render_chat"]
