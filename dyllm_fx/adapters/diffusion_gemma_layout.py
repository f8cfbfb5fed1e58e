"""DiffusionGemma's trace layout: what is traced as the step, with which inputs.

The step is the decoder over the canvas (see ``adapters/diffusion_gemma.py``)::

    step(input_ids (B, C)            the canvas
         attention_mask (B, C)       all ones (every canvas row is real)
         position_ids (B, C)         the canvas positions (after the whole prefix)
         self_conditioning_logits (B, C, V) float32, self_conditioning_mask (B,)
         key_mask_<layer type> (B, P_type + C)   which keys a canvas row may see: prefix padding
         k_prefix_<l>, ..., v_prefix_<l> ...      (B, KV_l, P_l, d_l): the encoder's cache
        ) -> logits (B, C, V)
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..errors import UsageError
from ..models.diffusion_gemma import decode_canvas
from ..passes.capture import capture

_SC_LOGITS, _SC_MASK = "self_conditioning_logits", "self_conditioning_mask"
# Example sizes of the trace: distinct values, so that each becomes its own symbol.
_TRACE_BATCH, _TRACE_CANVAS, _TRACE_PREFIX = 2, 13, (19, 11)


class PrefixCache:
    """The read-only view of an encoder cache the decoder needs while tracing: per layer
    ``keys`` / ``values`` (the decoder concatenates its canvas K/V after them)."""

    is_compileable = False

    def __init__(self, keys, values):
        self.layers = [types.SimpleNamespace(keys=k, values=v) for k, v in zip(keys, values)]


class StepLayout:
    """The step's inputs for one DiffusionGemma config: layer types, per-layer K/V shapes, names."""

    def __init__(self, model: nn.Module):
        text = model.config.text_config
        self.n_layers = text.num_hidden_layers
        self.layer_types = list(text.layer_types[: self.n_layers])
        self.types = sorted(set(self.layer_types))
        self.vocab_size = text.vocab_size
        self.canvas_length = model.config.canvas_length
        self.kv = []  # per layer (kv heads, head dim)
        for i in range(self.n_layers):
            layer = text.per_layer_config[i]
            self.kv.append((layer.num_key_value_heads, layer.head_dim))

    @property
    def input_names(self) -> tuple[str, ...]:
        return (
            "input_ids",
            "attention_mask",
            "position_ids",
            _SC_LOGITS,
            _SC_MASK,
            *(f"key_mask_{t}" for t in self.types),
            *(f"k_prefix_{i}" for i in range(self.n_layers)),
            *(f"v_prefix_{i}" for i in range(self.n_layers)),
        )

    def forward(self, model: nn.Module):
        """The decoder step as a function of the step's inputs (what gets traced)."""
        n_types, n_layers, layer_types = len(self.types), self.n_layers, self.types

        def step(input_ids, attention_mask, position_ids, sc_logits, sc_mask, *rest):
            masks, kv = rest[:n_types], rest[n_types:]
            cache = PrefixCache(kv[:n_layers], kv[n_layers:])
            mapping = {t: m[:, None, None, :] for t, m in zip(layer_types, masks)}
            return decode_canvas(model, input_ids, cache, sc_logits, mapping, position_ids, sc_mask)

        return step

    def example_inputs(self, model: nn.Module):
        """Inputs to trace with (zeros; only the shapes matter) and each one's symbolic dims."""
        device = next(model.parameters()).device
        dtype = model.model.decoder.embed_tokens.weight.dtype
        b, c = _TRACE_BATCH, _TRACE_CANVAS
        prefix = {t: _TRACE_PREFIX[0] if t == "full_attention" else _TRACE_PREFIX[1] for t in self.types}
        if len(set(prefix.values())) != len(prefix):
            prefix = {t: _TRACE_PREFIX[0] + 2 * i for i, t in enumerate(self.types)}
        inputs = [
            torch.zeros(b, c, dtype=torch.long, device=device),
            torch.ones(b, c, dtype=torch.long, device=device),
            torch.arange(c, device=device).expand(b, -1).contiguous() + max(prefix.values()),
            # float32 whatever the model's dtype: the decoder's softmax(dtype=float32) upcasts any
            # logits it is given first, so feeding it float32 is exact for every caller's dtype
            torch.zeros(b, c, self.vocab_size, dtype=torch.float32, device=device),
            torch.ones(b, dtype=torch.bool, device=device),
        ]
        dynamic = [(0, 1), (0, 1), (0, 1), (0, 1), (0,)]
        for t in self.types:
            inputs.append(torch.ones(b, prefix[t] + c, dtype=torch.bool, device=device))
            dynamic.append((0, 1))
        for _ in ("k", "v"):
            for i in range(self.n_layers):
                heads, dim = self.kv[i]
                inputs.append(
                    torch.zeros(b, heads, prefix[self.layer_types[i]], dim, dtype=dtype, device=device)
                )
                dynamic.append((0, 2))
        return tuple(inputs), dynamic


def capture_step(model: nn.Module):
    """The captured decoder step of ``model`` (see the module doc) and its layout."""
    check_model(model)
    layout = StepLayout(model)
    inputs, dynamic = layout.example_inputs(model)
    captured = capture(
        layout.forward(model), inputs, dict(model.named_parameters()), layout.input_names, dynamic
    )
    return captured, layout, inputs


def check_model(model: nn.Module) -> None:
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", None):
        raise UsageError(
            f"the DiffusionGemma model uses attn_implementation={impl!r}; load it with "
            "attn_implementation='sdpa' so "
            "the compiler sees attention as one op"
        )
    experts = getattr(model.config.get_text_config(), "_experts_implementation", None)
    if experts == "eager":
        raise UsageError(
            "the DiffusionGemma model uses experts_implementation='eager', a Python loop over the experts "
            "hit by the "
            "batch, which cannot be traced with symbolic row counts; load it with experts_implementation="
            "'grouped_mm' (transformers' default) or 'batched_mm'"
        )


__all__ = ["PrefixCache", "StepLayout", "capture_step", "check_model"]
