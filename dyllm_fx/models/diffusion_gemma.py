"""DiffusionGemma (transformers' ``DiffusionGemmaForBlockDiffusion``) through ``dyllm_fx.transform``.

DiffusionGemma is a block-diffusion model. Its generation (``generate()`` in transformers'
``generation_diffusion_gemma.py``) is an autoregressive loop over *canvases* of
``canvas_length`` tokens:

* the encoder (causal, Gemma 4's text stack) runs the prompt, and later each finished canvas,
  into a K/V cache: one growing prefix per layer (a sliding-window layer keeps its last
  ``sliding_window - 1`` keys);
* the decoder (the same weights, bidirectional) denoises the canvas over up to
  ``max_denoising_steps`` steps, attending to [that prefix ; the canvas], with
  self-conditioning on the previous step's logits.

So the encoder's cache already is a prefix cache, and what repeats is the decoder over the
canvas. That is what this module traces as the sparse step:

    step(input_ids (B, C)            the canvas
         attention_mask (B, C)       all ones (every canvas row is real)
         position_ids (B, C)         the canvas positions (after the whole prefix)
         self_conditioning_logits (B, C, V) float32, self_conditioning_mask (B,)
         key_mask_<layer type> (B, P_type + C)   which keys a canvas row may see: prefix padding
         k_prefix_<l>, ..., v_prefix_<l> ...      (B, KV_l, P_l, d_l): the encoder's cache
        ) -> logits (B, C, V)

The engine's rows are the canvas; the prefix K/V and the key masks are tables every attention
piece reads whole, and ``passes/attention_operands.py`` recognises the decoder's
``cat([cache, new])`` so the step cache holds the canvas rows with the same prefix in front.
The first step of a canvas (no self-conditioning logits yet) starts a new generation in the
engine (every row computed); the next steps are warm. Self-conditioning moves every row's
input at every step, which the program records (``h0_reads_state``), so DyLLM starts each
layer-0 from every row, as the official engine does for DiffusionGemma.

:class:`TransformedDiffusionGemma` keeps transformers' interface: its ``forward`` takes the
model's keyword arguments (the encoder runs as before when ``input_ids`` are given; the
decoder is the engine's step) and its ``generate`` is transformers' own
``DiffusionGemmaGenerationMixin.generate``. ``dyllm_fx.generate`` runs the same loop with this
project's sampler (``runtime/canvas.py``).

Limits: the dynamic cache only (transformers' default; a static cache lays the canvas out
differently), text only (no ``pixel_values``), and decoder masks that are key masks (every
canvas row sees the same keys: transformers' decoder masks are).
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import nn

from ..errors import UsageError

_SC_LOGITS, _SC_MASK = "self_conditioning_logits", "self_conditioning_mask"
_STATIC_CACHE = (
    "the transformed DiffusionGemma model reads a dynamic cache (transformers' default); a static cache "
    "(cache_implementation='static') lays the canvas out differently: drop cache_implementation"
)
# Example sizes of the trace: distinct values, so that each becomes its own symbol.
_TRACE_BATCH, _TRACE_CANVAS, _TRACE_PREFIX = 2, 13, (19, 11)


def is_diffusion_gemma(model) -> bool:
    """A transformers DiffusionGemma block-diffusion model (or a transformed one)."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    return (
        getattr(cfg, "model_type", None) == "diffusion_gemma"
        and hasattr(inner, "decoder")
        and hasattr(inner, "encoder")
    )


class _PrefixCache:
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
            cache = _PrefixCache(kv[:n_layers], kv[n_layers:])
            mapping = {t: m[:, None, None, :] for t, m in zip(layer_types, masks)}
            out = model(
                decoder_input_ids=input_ids,
                cache=cache,
                self_conditioning_logits=sc_logits,
                self_conditioning_mask=sc_mask,
                decoder_attention_mask=mapping,
                decoder_position_ids=position_ids,
            )
            return out.logits

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
    from ..passes.capture import capture

    _check_model(model)
    layout = StepLayout(model)
    inputs, dynamic = layout.example_inputs(model)
    captured = capture(
        layout.forward(model), inputs, dict(model.named_parameters()), layout.input_names, dynamic
    )
    return captured, layout, inputs


def _check_model(model: nn.Module) -> None:
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


def transform(model: nn.Module, policy, compile=False, cuda_graphs=False, **policy_config):
    """``dyllm_fx.transform`` for a DiffusionGemma model (see the module doc)."""
    from ..passes.check_bidirectional import check_bidirectional
    from ..runtime.policies import make_policy
    from ..transform import build_program

    chosen = make_policy(
        policy, family="diffusion_gemma", **policy_config
    )  # bad parameters fail before the trace
    if "es_dllm" in chosen.name.split("+"):
        raise UsageError(
            "es_dllm scores rows by the confidence of their masked tokens, and DiffusionGemma has no mask "
            "token (its "
            "canvas is renoised with random tokens); use policy='dyllm' (saliency), 'dllm_cache' or 'dense'"
        )
    captured, layout, inputs = capture_step(model)
    check_bidirectional(captured.gm, inputs)
    program = build_program(captured)
    chosen.check_model(len(program.attn))
    return transformed_class()(program, chosen, model, layout, compile=compile, cuda_graphs=cuda_graphs)


def _generation_mixin():
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationMixin

    return DiffusionGemmaGenerationMixin


_CLASS: list = []


def transformed_class():
    """:class:`TransformedDiffusionGemma` (built on first use: it subclasses transformers'
    generation mixin, and transformers is imported only when a DiffusionGemma model is used)."""
    if not _CLASS:
        _CLASS.append(_make_class())
    return _CLASS[0]


def _make_class():
    from ..transform import TransformedModel

    class TransformedDiffusionGemma(TransformedModel, _generation_mixin()):
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
            from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (
                DiffusionGemmaBlockDiffusionOutputWithPast,
            )

            if kwargs.get("pixel_values") is not None or mm_encoder_outputs is not None:
                raise UsageError(
                    "the transformed DiffusionGemma model takes text only (no pixel_values / "
                    "mm_encoder_outputs)"
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
                sc_logits = torch.zeros(
                    bsz, length, self.layout.vocab_size, dtype=torch.float32, device=device
                )
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
            from ..runtime.rows import bucket_size

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
                        "decoder_attention_mask must be 2-D (batch, prefix + canvas) or the decoder's mask "
                        "dict"
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

    return TransformedDiffusionGemma


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


# --- generation with this project's sampler (runtime/canvas.py) ----------------------------------


class DiffusionGemmaCalls:
    """The three model calls of the canvas loop (``runtime.canvas.CanvasModel``), the same for
    the untransformed model and a transformed one (they share transformers' calling
    convention): the encoder and the mask helpers are transformers' own."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.vocab_size = model.config.text_config.vocab_size
        self.canvas_length = model.config.canvas_length
        self.logits_dtype = model.model.decoder.embed_tokens.weight.dtype

    def new_cache(self, batch: int):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.get_text_config(decoder=True))

    def encode(self, ids, attention_mask, position_ids, cache):
        encoder = self.model.model.encoder
        dummy = torch.empty((ids.shape[0], ids.shape[1], 0), dtype=self.model.dtype, device=ids.device)
        masks = encoder.create_masks_for_generate(
            config=self.model.config,
            inputs_embeds=dummy,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        return encoder(input_ids=ids, attention_mask=masks, cache=cache, position_ids=position_ids).cache

    def decoder_masks(self, canvas, cache, decoder_attention_mask):
        return self.model.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.model.config,
            inputs_embeds=canvas.unsqueeze(-1),
            cache=cache,
            decoder_attention_mask=decoder_attention_mask,
        )

    def decode(self, canvas, sc_logits, masks, cache, position_ids):
        out = self.model(
            decoder_input_ids=canvas,
            self_conditioning_logits=sc_logits,
            decoder_attention_mask=masks,
            cache=cache,
            decoder_position_ids=position_ids,
        )
        return out.logits


SAMPLER_OPTIONS = (
    "entropy_bound",
    "t_min",
    "t_max",
    "stability_threshold",
    "confidence_threshold",
    "eos_token_id",
    "pad_token_id",
)


def generate_ids(
    model: nn.Module, input_ids, attention_mask=None, max_new_tokens=None, steps=None, seed=None, **options
):
    """DiffusionGemma generation from token ids with ``runtime.canvas``'s sampler (the settings of
    the model's generation config, then ``options``: see ``SAMPLER_OPTIONS``)."""
    from ..runtime.canvas import CanvasSettings, generate_canvases

    unknown = sorted(set(options) - set(SAMPLER_OPTIONS))
    if unknown:
        raise UsageError(
            f"unknown DiffusionGemma sampler option(s) {unknown}; it takes max_new_tokens, steps "
            "(max_denoising_steps), "
            f"seed and {', '.join(SAMPLER_OPTIONS)}"
        )
    eos = options.pop("eos_token_id", None)
    settings = CanvasSettings.from_generation_config(
        model.generation_config,
        max_new_tokens=max_new_tokens,
        max_denoising_steps=steps,
        eos_token_ids=eos,
        **options,
    )
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = generate_canvases(DiffusionGemmaCalls(model), input_ids, attention_mask, settings)
    out.stats.cache_bytes = int(getattr(model, "allocated_nbytes", 0) or 0)
    return out


def generate(model: nn.Module, tokenizer, prompts, max_new_tokens=None, steps=None, seed=None, **options):
    """``dyllm_fx.generate`` for DiffusionGemma: prompts (left padded) -> canvases of tokens."""
    if isinstance(prompts, str):
        prompts = [prompts]
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    out = generate_ids(model, ids, mask, max_new_tokens=max_new_tokens, steps=steps, seed=seed, **options)
    eos, pad = set(out.settings.eos_token_ids), out.settings.pad_token_id
    texts = []
    for row in out.responses.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tokenizer.decode([t for t in row[:cut] if t != pad], skip_special_tokens=True))
    out.texts = texts
    return out


# --- torch.compile(model, backend="dyllm") ---------------------------------------------------------

_SHARED: "weakref.WeakKeyDictionary" = None  # module -> {options key: transformed model}


def dynamo_step(module: nn.Module, gm, options: dict):
    """The dyllm backend's callable for a graph dynamo traced from ``module``'s forward: a decoder
    call goes through the module's transformed model (one per module and options, shared by
    every graph); any other graph (one that runs the encoder) runs as it is."""
    import warnings

    global _SHARED
    roles = _dynamo_roles(gm)
    outputs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    if roles is None or n_out != 1:
        warnings.warn(
            "dyllm backend: this DiffusionGemma graph is not a decoder call (decoder_input_ids over an "
            "encoder cache, "
            "returning logits); it runs as dynamo traced it, untransformed",
            stacklevel=2,
        )
        return gm.forward
    policy = options.pop("policy", "dense")
    compile_step = options.pop("compile_step", options.pop("compile_pieces", True))
    options.pop("mask_token_id", None)
    options.pop("block_length", None)
    if _SHARED is None:
        _SHARED = weakref.WeakKeyDictionary()
    key = (
        repr(policy),
        bool(compile_step) if not isinstance(compile_step, str) else compile_step,
        repr(sorted(options.items())),
    )
    per_module = _SHARED.setdefault(module, {})
    built: list = []

    def transformed():
        # built on the first real call: while the backend runs, dynamo's fake-tensor mode is
        # active, and the capture needs the real weights
        if not built:
            if key not in per_module:
                per_module[key] = transform(module, policy, compile=compile_step, **options)
            built.append(per_module[key])
        return built[0]

    def compiled(*inputs):
        model = transformed()
        layout = model.layout
        got = {}
        for i, role in roles.items():
            got[role] = inputs[i]
        keys = [got[("k", i)] for i in range(layout.n_layers)]
        values = [got[("v", i)] for i in range(layout.n_layers)]
        masks = {t: got.get(("mask", t)) for t in layout.types}
        with torch.no_grad():
            logits = model.decode(
                got["canvas"],
                _PrefixCache(keys, values),
                got.get("sc"),
                got.get("sc_mask"),
                masks,
                got.get("pos"),
            )
        return (logits,)

    compiled.transformed = built  # filled on the first call: [TransformedDiffusionGemma]
    return compiled


def _dynamo_roles(gm) -> dict | None:
    """Graph input index -> role, from the inputs' sources; None when the graph is not a decoder
    call this module can map (it reads input_ids, a 2-D decoder mask, or an unknown input)."""
    import re

    roles = {}
    names = {
        "['decoder_input_ids']": "canvas",
        "['self_conditioning_logits']": "sc",
        "['self_conditioning_mask']": "sc_mask",
        "['decoder_position_ids']": "pos",
    }
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = (
            source.name
            if isinstance(getattr(source, "name", None), str)
            else (source.name() if source is not None else "")
        )
        value = node.meta.get("example_value")
        if name.startswith("L['self']") or not isinstance(value, torch.Tensor):
            continue  # weights, buffers and symbolic sizes
        role = next((r for suffix, r in names.items() if name.endswith(suffix)), None)
        if role is None and (m := re.search(r"\.layers\[(\d+)\]\.(keys|values)$", name)):
            role = ("k" if m.group(2) == "keys" else "v", int(m.group(1)))
        if role is None and (m := re.search(r"\['decoder_attention_mask'\]\['(\w+)'\]$", name)):
            role = ("mask", m.group(1))
        if role is None:
            return None
        roles[i] = role
    return roles if "canvas" in roles.values() else None


# --- small random models (tests, benchmarks: random weights have no accuracy to report) -----------


def random_config(**text_overrides):
    """A small DiffusionGemma config: every size scaled down, sliding and full layers, a mixture
    of experts, a small canvas. ``text_overrides`` update the text config; ``canvas_length``
    goes to the outer config."""
    from transformers import DiffusionGemmaConfig

    canvas = text_overrides.pop("canvas_length", 8)
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=16,
        sliding_window=6,
        max_position_embeddings=512,
        layer_types=None,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    text.update(text_overrides)
    if text["layer_types"] is None:  # alternate, ending on a full layer (transformers requires it)
        n = text["num_hidden_layers"]
        text["layer_types"] = [
            "full_attention" if (n - 1 - i) % 2 == 0 else "sliding_attention" for i in range(n)
        ]
    vision = dict(
        model_type="gemma4_vision",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
    )
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas)
    config._attn_implementation = "sdpa"
    return config


def random_model(seed: int = 0, dtype: torch.dtype = torch.float32, **text_overrides):
    """A DiffusionGemmaForBlockDiffusion with random weights (transformers' own initialisation)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    config = random_config(**text_overrides)
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(config).eval().to(dtype)


def __getattr__(name):
    if name == "TransformedDiffusionGemma":
        return transformed_class()
    raise AttributeError(name)


__all__ = [
    "DiffusionGemmaCalls",
    "SAMPLER_OPTIONS",
    "StepLayout",
    "capture_step",
    "dynamo_step",
    "generate",
    "generate_ids",
    "is_diffusion_gemma",
    "random_config",
    "random_model",
    "transform",
    "transformed_class",
]
