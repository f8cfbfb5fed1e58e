"""Block diffusion over canvases (DiffusionGemma): the entropy-bound sampler and its loop.

Written from the semantics of transformers' ``generation_diffusion_gemma.py``
(``DiffusionGemmaGenerationMixin.generate`` and its helpers), so that with the same seed the
two draw the same random numbers in the same order and give the same tokens:

* an autoregressive loop over canvases of ``canvas_length`` tokens. Before each canvas the
  encoder runs what it has not seen (the prompt, then the last canvas) into its K/V cache;
* per canvas, a denoising loop of up to ``max_denoising_steps`` steps, counted down from N to 1.
  The canvas starts uniformly random. Each step:

  1. logits = decoder(canvas, self-conditioning logits of the last step (none at the first));
  2. temperature t = t_min + (t_max - t_min) * step / N (linear, hottest first); the logits / t
     are the step's *processed* logits;
  3. a token per position is drawn from softmax(processed) (the denoiser canvas), and the
     argmax is kept (the draft);
  4. acceptance (entropy bound, arXiv 2505.24857): sort the positions by the entropy of their
     processed distribution, accept the k lowest with sum(entropy) - max(entropy) <= bound;
     accepted positions take the drawn token, the others keep the current one;
  5. renoising: every position not accepted gets a fresh uniformly random token;
  6. stopping: a batch element is done once its draft was the same for ``stability_threshold``
     steps and the mean entropy of its processed logits is below ``confidence_threshold``;
     a done element keeps its canvas, draft and self-conditioning logits;
  7. the processed logits are the next step's self-conditioning logits;

  the canvas's draft (argmax) is appended to the sequence;
* after each canvas: an element is finished when the sequence reached its maximum length or
  its new canvas holds an EOS; tokens after the first EOS, and whole canvases after an
  element finished, become ``pad_token_id``. The loop ends when every element finished.

The model side is three calls (``CanvasModel``), so the same loop runs the untransformed model
and a transformed one (``dyllm_fx.adapters.diffusion_gemma_generation``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class CanvasSettings:
    """DiffusionGemma's generation settings. The defaults are transformers'
    (``DiffusionGemmaGenerationConfig._get_default_generation_params``); a checkpoint's
    ``generation_config.json`` overrides them (:meth:`from_generation_config`)."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @classmethod
    def from_generation_config(cls, config, **overrides) -> "CanvasSettings":
        """Settings from a transformers generation config (unset fields keep the defaults), then
        ``overrides`` (None values ignored)."""
        values = {}
        sampler = getattr(config, "sampler_config", None)
        bound = (
            getattr(sampler, "entropy_bound", None)
            if not isinstance(sampler, dict)
            else sampler.get("entropy_bound")
        )
        if bound is not None:
            values["entropy_bound"] = bound
        for name in (
            "max_new_tokens",
            "max_denoising_steps",
            "t_min",
            "t_max",
            "stability_threshold",
            "confidence_threshold",
            "pad_token_id",
        ):
            value = getattr(config, name, None)
            if value is not None:
                values[name] = value
        eos = getattr(config, "eos_token_id", None)
        if eos is not None:
            values["eos_token_ids"] = (eos,) if isinstance(eos, int) else tuple(eos)
        for name, value in overrides.items():
            if value is None:
                continue
            if name == "eos_token_ids":
                value = (value,) if isinstance(value, int) else tuple(value)
            values[name] = value
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        for name in ("max_new_tokens", "max_denoising_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if (
            not isinstance(self.entropy_bound, (int, float))
            or isinstance(self.entropy_bound, bool)
            or self.entropy_bound <= 0
        ):
            raise ValueError(f"entropy_bound must be a number > 0, got {self.entropy_bound!r}")
        if self.t_min < 0 or self.t_max < 0 or self.t_max <= self.t_min:
            raise ValueError(f"need 0 <= t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if (
            isinstance(self.stability_threshold, bool)
            or not isinstance(self.stability_threshold, int)
            or self.stability_threshold < 0
        ):
            raise ValueError(f"stability_threshold must be an integer >= 0, got {self.stability_threshold!r}")
        if self.confidence_threshold <= 0:
            raise ValueError(f"confidence_threshold must be > 0, got {self.confidence_threshold!r}")


def temperature(step: int, steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """The linear schedule's temperature at ``step`` (counted down from ``steps`` to 1), as a
    0-d float32 tensor computed in the same order and precision as transformers'
    ``LinearTemperatureScheduleLogitsProcessor`` (so the processed logits match bit for bit)."""
    return t_min + (t_max - t_min) * (torch.tensor(step, dtype=torch.int32) / steps)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim (natural log)."""
    return torch.distributions.Categorical(logits=logits).entropy()


class EntropyBoundSampler:
    """Accept the lowest-entropy positions while sum(entropy) - max(entropy) <= ``bound``; renoise
    the rest with uniformly random tokens (see the module doc)."""

    def __init__(self, bound: float, vocab_size: int, canvas_length: int):
        self.bound = bound
        self.vocab_size = vocab_size
        self.canvas_length = canvas_length

    def initial(self, batch: int, device) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (batch, self.canvas_length), device=device)

    def accepted(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) bool: the positions accepted at this step."""
        entropy = token_entropy(logits)
        ordered, order = torch.sort(entropy, dim=-1)
        # sorted ascending, so each prefix's max is its last entry
        take = torch.cumsum(ordered, dim=-1) - ordered <= self.bound
        return torch.zeros_like(take).scatter(-1, order, take)

    def step(
        self, current: torch.Tensor, drawn: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the next canvas, the accepted mask): accepted positions take ``drawn``, the others are
        renoised."""
        accepted = self.accepted(logits)
        kept = torch.where(accepted, drawn, current)
        noise = self.initial(current.shape[0], current.device)
        return torch.where(accepted, kept, noise), accepted


class StableAndConfident:
    """Per batch element: done when the draft held for ``stability`` steps and the mean entropy of
    the processed logits is below ``confidence``."""

    def __init__(self, stability: int, confidence: float):
        self.stability = stability
        self.confidence = confidence
        self.history: torch.Tensor | None = None

    def reset(self) -> None:
        self.history = None

    def __call__(self, draft: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.stability == 0:
            stable = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        else:
            if self.history is None:
                self.history = torch.full(
                    (self.stability, *draft.shape), -1, dtype=draft.dtype, device=draft.device
                )
            stable = (self.history == draft[None]).all(-1).all(0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = draft
        return stable & (token_entropy(logits).mean(-1) < self.confidence)


class CanvasModel(Protocol):
    """What the loop needs from a block-diffusion model (``adapters/diffusion_gemma_generation.py``)."""

    vocab_size: int
    canvas_length: int
    logits_dtype: torch.dtype  # the dtype self-conditioning logits are fed back in

    def new_cache(self, batch: int): ...

    def encode(self, ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache): ...

    def decoder_masks(self, canvas: torch.Tensor, cache, decoder_attention_mask: torch.Tensor): ...

    def decode(self, canvas, sc_logits, masks, cache, position_ids) -> torch.Tensor: ...


@dataclass
class CanvasStats:
    nfe: int = 0  # decoder calls (batched)
    canvases: int = 0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    steps_per_canvas: list[int] = field(default_factory=list)
    tokens_per_forward: list[float] = field(default_factory=list)  # per element, transformers' definition
    tokens_per_second: float = 0.0
    cache_bytes: int = 0


@dataclass
class CanvasOutput:
    sequences: torch.Tensor  # (B, P + n * C): prompt then the canvases' drafts (pad after EOS)
    prompt_length: int
    stats: CanvasStats
    texts: list[str] = field(default_factory=list)
    settings: CanvasSettings | None = None

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]


def generate_canvases(
    model: CanvasModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: CanvasSettings,
) -> CanvasOutput:
    """Decode ``settings.max_new_tokens`` tokens (rounded up to whole canvases) after
    ``input_ids`` (B, P, left padded with ``attention_mask``)."""
    settings.check()
    ids = input_ids
    bsz, cur_len = ids.shape
    prompt_len = cur_len
    device = ids.device
    length = model.canvas_length
    n_canvases = math.ceil(settings.max_new_tokens / length)
    max_length = cur_len + settings.max_new_tokens
    mask = (
        torch.ones(bsz, cur_len, dtype=torch.bool, device=device)
        if attention_mask is None
        else attention_mask.bool()
    )
    decoder_mask = torch.nn.functional.pad(mask, (0, length), value=True)
    enc_pos = torch.arange(0, cur_len, dtype=torch.int32, device=device)[None]
    dec_pos = torch.arange(cur_len, cur_len + length, dtype=torch.int32, device=device)[None]
    sampler = EntropyBoundSampler(settings.entropy_bound, model.vocab_size, length)
    stopper = StableAndConfident(settings.stability_threshold, settings.confidence_threshold)
    eos = torch.tensor(settings.eos_token_ids, device=device) if settings.eos_token_ids else None
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    forwards = torch.zeros(bsz, dtype=torch.int, device=device)
    stats = CanvasStats()
    cache = model.new_cache(bsz)
    started = time.perf_counter()
    for index in range(n_canvases):
        fresh = ids if index == 0 else ids[:, -length:]
        cache = model.encode(fresh.contiguous(), mask, enc_pos, cache)
        canvas = sampler.initial(bsz, device)
        masks = model.decoder_masks(canvas, cache, decoder_mask)
        sc_logits = None
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        stopper.reset()
        draft = canvas
        steps = 0
        for step in range(settings.max_denoising_steps, 0, -1):
            forwards += ~(done | finished)
            tick = time.perf_counter()
            logits = model.decode(canvas, sc_logits, masks, cache, dec_pos)
            processed = logits / temperature(
                step, settings.max_denoising_steps, settings.t_min, settings.t_max
            )
            probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
            drawn = torch.multinomial(probs.view(-1, model.vocab_size), num_samples=1).view(bsz, length)
            new_draft = processed.argmax(-1)
            new_canvas, _ = sampler.step(canvas, drawn, processed)
            if done.any():  # finished elements keep their state
                new_draft = torch.where(done[:, None], draft, new_draft)
                new_canvas = torch.where(done[:, None], canvas, new_canvas)
                processed = torch.where(done[:, None, None], sc_logits, processed)
            done = done | stopper(new_draft, processed)
            canvas, draft = new_canvas, new_draft
            sc_logits = processed.to(model.logits_dtype)
            stats.step_seconds.append(time.perf_counter() - tick)
            stats.nfe += 1
            steps += 1
            if bool(done.all()):
                break
        stats.steps_per_canvas.append(steps)
        stats.canvases += 1
        ids = torch.cat([ids, draft], dim=-1)
        ids, finished = _finish_canvas(ids, finished, max_length, length, eos, settings.pad_token_id)
        if bool(finished.all()):
            break
        cur_len += length
        decoder_mask = torch.nn.functional.pad(decoder_mask, (0, length), value=True)
        mask = torch.nn.functional.pad(mask, (0, length), value=True)
        enc_pos = dec_pos
        dec_pos = torch.arange(cur_len, cur_len + length, dtype=torch.int32, device=device)[None]
    stats.seconds = time.perf_counter() - started
    new = ids[:, prompt_len:]
    valid = (
        (new != settings.pad_token_id).sum(-1)
        if settings.pad_token_id is not None
        else torch.full_like(forwards, new.shape[1])
    )
    stats.tokens_per_forward = (valid / forwards.clamp_min(1)).tolist()
    stats.tokens_per_second = bsz * new.shape[1] / stats.seconds if stats.seconds > 0 else 0.0
    return CanvasOutput(ids, prompt_len, stats, settings=settings)


def _finish_canvas(ids, finished, max_length: int, length: int, eos, pad: int | None):
    """Which elements finished with this canvas (length reached or an EOS in it), and the pads:
    whole canvases after an element finished, tokens after the first EOS of this canvas."""
    new = ids[:, -length:]
    now = torch.full_like(finished, ids.shape[1] >= max_length)
    if eos is not None:
        now = now | torch.isin(new, eos).any(-1)
    before, finished = finished, finished | now
    if pad is not None and bool(finished.any()):
        ids[before, -length:] = pad
        if eos is not None and bool(now.any()):
            new = ids[:, -length:]
            is_eos = torch.isin(new, eos)
            seen = is_eos.cumsum(-1)
            new[(seen > 0) & ~((seen == 1) & is_eos)] = pad
    return ids, finished


__all__ = [
    "CanvasModel",
    "CanvasOutput",
    "CanvasSettings",
    "CanvasStats",
    "EntropyBoundSampler",
    "StableAndConfident",
    "generate_canvases",
    "temperature",
    "token_entropy",
]
