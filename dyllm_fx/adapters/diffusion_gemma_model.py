"""The transformed DiffusionGemma model: transformers' interface, the decoder step on the engine.

:class:`TransformedDiffusionGemma` keeps transformers' interface: its ``forward`` takes the
model's keyword arguments (the encoder runs as before when ``input_ids`` are given; the
decoder is the engine's step) and its ``generate`` is transformers' own
``DiffusionGemmaGenerationMixin.generate``. This module imports transformers: the adapter
imports it only when a DiffusionGemma model is transformed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationMixin
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (
    DiffusionGemmaBlockDiffusionOutputWithPast,
)

from ..errors import UsageError
from ..runtime.rows import bucket_size
from .diffusion_gemma_layout import StepLayout
from .transformed import TransformedModel

_STATIC_CACHE = (
    "the transformed DiffusionGemma model reads a dynamic cache (transformers' default); a static cache "
    "(cache_implementation='static') lays the canvas out differently: drop cache_implementation"
)


class TransformedDiffusionGemma(TransformedModel, DiffusionGemmaGenerationMixin):
    """A DiffusionGemma model whose decoder step runs on the sparse-step engine.

    ``forward`` takes the keyword arguments of ``DiffusionGemmaForBlockDiffusion.forward``
    and returns its output type (the encoder, when ``input_ids`` are given, runs unchanged;
    the decoder is the engine's step). ``generate`` is transformers' own; ``dyllm_fx.generate``
    takes it too.
    """

    def __init__(
        self, program, policy, source: nn.Module, layout: StepLayout, compile=False, cuda_graphs=False
    ):
        super().__init__(program, policy, None, compile=compile, cuda_graphs=cuda_graphs)
        self.model = source.model  # the encoder, the decoder's mask helpers: shared weights
        self.config = source.config
        self.generation_config = source.generation_config
        self.layout = layout
        self.source_class = type(source).__name__
        self._canvas_key: tuple | None = None
        self._masks_for: tuple | None = None
        self._masks: tuple | None = None
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.program.hidden_dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def can_generate(self) -> bool:
        return True

    def generate(self, *args, **kwargs):
        """transformers' ``DiffusionGemmaGenerationMixin.generate``; a cache other than the
        dynamic one is refused here, before transformers builds it (with a static cache it
        also wraps the forward in ``torch.compile``, which would bury the message)."""
        config = kwargs.get("generation_config") or self.generation_config
        impl = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        if impl not in (None, "dynamic"):
            raise UsageError(_STATIC_CACHE)
        return super().generate(*args, **kwargs)

    def make_step_function(self):
        raise TypeError(
            "a DiffusionGemma model decodes canvases with its own sampler: call dyllm_fx.generate(model, "
            "tokenizer, "
            "prompts) or model.generate(input_ids)"
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        cache=None,
        position_ids=None,
        decoder_input_ids=None,
        self_conditioning_logits=None,
        self_conditioning_mask=None,
        decoder_attention_mask=None,
        decoder_position_ids=None,
        mm_encoder_outputs=None,
        **kwargs,
    ):
        if kwargs.get("pixel_values") is not None or mm_encoder_outputs is not None:
            raise UsageError(
                "the transformed DiffusionGemma model takes text only (no pixel_values / mm_encoder_outputs)"
            )
        encoder_last_hidden_state = None
        if input_ids is not None:
            enc = self.model.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                **kwargs,
            )
            cache, encoder_last_hidden_state = enc.cache, enc.last_hidden_state
        elif cache is None:
            raise ValueError("Either `input_ids` or `cache` must be provided.")
        if decoder_input_ids is None:  # as the original: a uniformly random canvas
            batch = input_ids.shape[0] if input_ids is not None else cache.layers[0].keys.shape[0]
            decoder_input_ids = torch.randint(
                0, self.layout.vocab_size, (batch, self.config.canvas_length), device=self.device
            )
        logits = self.decode(
            decoder_input_ids,
            cache,
            self_conditioning_logits,
            self_conditioning_mask,
            decoder_attention_mask,
            decoder_position_ids,
        )
        return DiffusionGemmaBlockDiffusionOutputWithPast(
            logits=logits, cache=cache, encoder_last_hidden_state=encoder_last_hidden_state
        )

    def decode(
        self, canvas, cache, sc_logits=None, sc_mask=None, decoder_attention_mask=None, position_ids=None
    ):
        """One denoising step of the canvas (B, C) over the encoder cache: logits (B, C, V)."""
        if canvas.is_floating_point():
            raise TypeError(f"decoder_input_ids must hold token ids, got dtype {canvas.dtype}")
        bsz, length = canvas.shape
        device = canvas.device
        keys, values = _prefix(cache, self.layout)
        if position_ids is None:
            start = cache.get_seq_length(layer_idx=0)
            position_ids = torch.arange(start, start + length, device=device)[None]
        position_ids = position_ids.to(device=device, dtype=torch.long).expand(bsz, length)
        masks = self._key_masks(decoder_attention_mask, cache, keys, canvas)
        first = sc_logits is None
        if first:
            sc_logits = torch.zeros(bsz, length, self.layout.vocab_size, dtype=torch.float32, device=device)
            sc_mask = torch.zeros(bsz, dtype=torch.bool, device=device)
        elif sc_mask is None:
            sc_mask = torch.ones(bsz, dtype=torch.bool, device=device)
        canvas_key = (bsz, length, *((k.shape, k.data_ptr()) for k in keys))
        if first or canvas_key != self._canvas_key:
            self.engine.reset()  # a new canvas (or a new prefix): nothing cached is valid
        self._canvas_key = canvas_key
        if self.engine.compile:  # a compiled step is specialised to its shapes: bucket the prefix
            keys, values, masks = self._bucket_prefix(keys, values, masks)
        # float32 as traced (exact: the decoder upcasts to float32 before its softmax anyway)
        extras = (sc_logits.to(torch.float32), sc_mask.bool(), *masks, *keys, *values)
        everywhere = torch.arange(length, device=device).expand(bsz, -1)
        out = self.engine.step(
            canvas,
            torch.ones_like(canvas),
            position_ids,
            everywhere,
            extras=extras,
            step=len(self.engine.records),
            block_start=0,
            block_end=length,
            response_start=0,
        )
        return out.logits

    def _bucket_prefix(self, keys, values, masks):
        """The prefix padded with masked keys to a power-of-two multiple of the canvas length,
        so that a compiled step recompiles a few times over a long generation, not once per
        canvas (the prefix grows by a canvas each time). Masked keys add nothing to the
        attention (exactly so in exact arithmetic)."""
        length = self.layout.canvas_length or 1
        by_type = {}
        for t, k in zip(self.layout.layer_types, keys):
            by_type.setdefault(t, (k.shape[2], bucket_size(k.shape[2], 1 << 40, minimum=length)))
        pad = lambda x, n: torch.nn.functional.pad(x, (0, 0, 0, n))  # noqa: E731  (dim 2 of (B, KV, P, d))
        out_k, out_v = [], []
        for t, k, v in zip(self.layout.layer_types, keys, values):
            have, want = by_type[t]
            out_k.append(pad(k, want - have))
            out_v.append(pad(v, want - have))
        out_m = []
        for t, m in zip(self.layout.types, masks):
            have, want = by_type[t]
            hole = torch.zeros(m.shape[0], want - have, dtype=m.dtype, device=m.device)
            out_m.append(torch.cat([m[:, :have], hole, m[:, have:]], 1))
        return out_k, out_v, tuple(out_m)

    def _key_masks(self, decoder_attention_mask, cache, keys, canvas) -> tuple[torch.Tensor, ...]:
        """Per layer type, the (B, P + C) bool key mask of the decoder's attention."""
        bsz, length = canvas.shape
        lengths = {}
        for t, k in zip(self.layout.layer_types, keys):
            lengths.setdefault(t, k.shape[2] + length)
        # Reused while the caller passes the same mask objects (transformers builds one per
        # canvas and passes it at every step). The memo holds them, so that their ids cannot be
        # reused by new objects; a mask changed in place would not be seen.
        parts = tuple(decoder_attention_mask.values()) if isinstance(decoder_attention_mask, dict) else ()
        memo = (decoder_attention_mask, parts, tuple(lengths.items()), bsz)
        if (
            decoder_attention_mask is not None
            and self._masks is not None
            and _same_objects(memo, self._masks_for)
        ):
            return self._masks
        mapping = decoder_attention_mask
        if isinstance(mapping, torch.Tensor):
            if mapping.dim() != 2:
                raise UsageError(
                    "decoder_attention_mask must be 2-D (batch, prefix + canvas) or the decoder's mask dict"
                )
            mapping = self.model.decoder.create_diffusion_decoder_attention_mask(
                config=self.config,
                inputs_embeds=canvas.unsqueeze(-1),
                cache=cache,
                decoder_attention_mask=mapping,
            )
        out = []
        for t in self.layout.types:
            mask = None if mapping is None else mapping.get(t)
            out.append(_key_mask(mask, bsz, lengths[t], canvas.device, t))
        self._masks_for, self._masks = memo, tuple(out)
        return self._masks


def _same_objects(a: tuple, b: tuple | None) -> bool:
    """Whether two memo keys (mask, its parts, lengths, batch) name the same mask objects."""
    if b is None or a[0] is not b[0] or len(a[1]) != len(b[1]):
        return False
    return all(x is y for x, y in zip(a[1], b[1])) and a[2:] == b[2:]


def _prefix(cache, layout: StepLayout):
    """Per layer, the encoder cache's keys and values (B, KV, P_l, d)."""
    if cache is None:
        raise ValueError("the decoder reads the encoder prefix from `cache`, which must not be None")
    if getattr(cache, "is_compileable", False):
        raise UsageError(_STATIC_CACHE)
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) < layout.n_layers:
        raise ValueError(
            f"the encoder cache holds {len(layers or [])} layers; the decoder has {layout.n_layers}"
        )
    keys = [layers[i].keys for i in range(layout.n_layers)]
    values = [layers[i].values for i in range(layout.n_layers)]
    if any(k is None or k.dim() != 4 for k in keys):
        raise ValueError(
            "the encoder cache is empty; run the encoder on the prompt first (model(input_ids=...))"
        )
    return keys, values


def _key_mask(mask, bsz: int, n_keys: int, device, layer_type: str) -> torch.Tensor:
    """A decoder mask (None, or 4-D (B|1, 1, C, N) bool / additive) as a (B, N) bool key mask."""
    if mask is None:
        return torch.ones(bsz, n_keys, dtype=torch.bool, device=device)
    if mask.dim() != 4 or mask.shape[-1] != n_keys or mask.shape[1] != 1:
        raise UsageError(
            f"the decoder mask for {layer_type} has shape {tuple(mask.shape)}; expected (batch, 1, canvas, "
            f"{n_keys})"
        )
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0
        blocked = mask[~allowed]
        if blocked.numel() and bool((blocked > torch.finfo(mask.dtype).min / 2).any()):
            raise UsageError(
                "the decoder mask adds a bias other than 0 / -inf; the transformed model takes key masks only"
            )
    first = allowed[:, :, :1]
    if not bool((allowed == first).all()):
        raise UsageError(
            "the decoder mask differs between canvas rows; the transformed model takes key masks (every "
            "canvas row "
            "sees the same keys), which is what transformers' DiffusionGemma builds"
        )
    return first[:, 0, 0].expand(bsz, n_keys).contiguous()


__all__ = ["TransformedDiffusionGemma"]
