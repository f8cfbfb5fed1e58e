"""lm-evaluation-harness model ``dyllm``: any dyllm-fx model and policy as an lm-eval LM.

Importing this module registers the model with lm-eval (it needs the ``eval`` extra:
``pip install "dyllm-fx[eval]"``; ``import dyllm_fx`` alone never imports lm_eval).
lm-eval has no plugin discovery, so run its command line through ``dyllm-lm-eval`` (or
``python -m dyllm_fx.cli.lm_eval``), which registers the model first and then hands every
argument to lm-eval::

    dyllm-lm-eval --model dyllm \\
        --model_args pretrained=/models/LLaDA-8B-Instruct,policy=dual_cache,gen_length=256,block_length=32 \\
        --tasks gsm8k --batch_size 8

or from Python: ``import dyllm_fx.eval.lm_eval_adapter`` then ``lm_eval.simple_evaluate(model="dyllm", ...)``.

Only generation tasks (``generate_until``) are supported. A masked diffusion model has no
left-to-right factorisation, so a continuation's log-likelihood is not one forward pass:
it needs a Monte-Carlo estimate of the ELBO over random maskings (as the LLaDA paper's
evaluation does), which this adapter does not implement.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # the message a user sees instead of a bare ModuleNotFoundError
    raise ImportError(
        'the lm-eval adapter needs lm-evaluation-harness: pip install "dyllm-fx[eval]"'
    ) from err

from ..generation import generate
from ..policy_setup import VANILLA, apply_policy, records_of

log = logging.getLogger(__name__)

_LOGLIKELIHOOD_UNSUPPORTED = (
    "dyllm: {kind} is not supported. A masked diffusion LM has no left-to-right factorisation, so the "
    "log-likelihood of a continuation needs a Monte-Carlo estimate of the ELBO over random maskings "
    "(LLaDA's evaluation does this with ~128 samples per request), which this adapter does not implement. "
    "Use generation tasks (output_type: generate_until), e.g. gsm8k."
)
_POLICY_PREFIX = "policy_"


@register_model("dyllm")
class DyLLMEvalLM(LM):
    """lm-eval LM over ``dyllm_fx.generate``.

    Model arguments (``--model_args key=value,...``):
        pretrained: model folder or ``default`` (the embedded model).
        policy: ``vanilla`` (untransformed) or a :func:`dyllm_fx.transform` policy name;
            its parameters as ``policy_<name>=value`` (``policy_tau=0.99``).
        gen_length: response window when a request gives no ``max_gen_toks`` (default 256).
        block_length, steps, threshold, temperature, remasking, alg, cfg_scale: decoding,
            as ``dyllm_fx.generate``. ``steps`` sets steps per token (``steps / gen_length``),
            kept when a request's ``max_gen_toks`` changes the window.
        batch_size, device, dtype (``bfloat16``, ``float32``...), compile.
        model, tokenizer: an already loaded pair instead of ``pretrained`` (Python use).
    """

    def __init__(
        self,
        pretrained: str = "default",
        policy: str = VANILLA,
        gen_length: int = 256,
        block_length: int = 32,
        steps: int | None = None,
        threshold: float | None = None,
        temperature: float = 0.0,
        remasking: str | None = None,
        alg: str | None = None,
        cfg_scale: float = 0.0,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        compile: bool = False,
        seed: int = 0,
        model=None,
        tokenizer=None,
        **policy_args,
    ):
        super().__init__()
        unknown = [k for k in policy_args if not k.startswith(_POLICY_PREFIX)]
        if unknown:
            raise ValueError(
                f"dyllm: unknown model_args {unknown}; policy parameters are written policy_<name>=value "
                "(e.g. policy_tau=0.99)"
            )
        params = {k[len(_POLICY_PREFIX) :]: v for k, v in policy_args.items()}
        if model is None:
            from ..loading import load

            if isinstance(dtype, str):
                dtype = getattr(torch, dtype)
            # lm-eval's command line passes device="cuda:0" by default, GPU or not.
            if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
                log.warning(
                    "dyllm: device %s requested but CUDA is not available; running on the CPU", device
                )
                device = "cpu"
            model, tokenizer = load(pretrained, dtype=dtype, device=device)
        elif tokenizer is None:
            raise ValueError("dyllm: pass tokenizer= together with model=")
        self.base_model, self.tokenizer = model, tokenizer
        self.model = apply_policy(model, policy, params, compile=compile)
        self.policy, self.pretrained = policy, str(pretrained)
        self.gen_length, self.block_length = int(gen_length), int(block_length)
        self.steps_per_token = None if steps is None else int(steps) / self.gen_length
        self.threshold, self.cfg_scale, self.temperature, self.seed = threshold, cfg_scale, temperature, seed
        self.sampler_params = {k: v for k, v in (("remasking", remasking), ("alg", alg)) if v}
        # lm-eval passes "auto" (and "auto:N") for automatic sizing; a diffusion step's memory
        # grows with the window, so use a fixed, modest batch instead of probing.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._device = next(model.parameters()).device
        self.stats = {"generations": 0, "nfe": 0, "seconds": 0.0, "tokens": 0, "active": []}

    # -- lm-eval interface ------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            _LOGLIKELIHOOD_UNSUPPORTED.format(kind="loglikelihood (multiple-choice tasks)")
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            _LOGLIKELIHOOD_UNSUPPORTED.format(kind="loglikelihood_rolling (perplexity tasks)")
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode every request's context; cut each response at its first ``until`` string."""
        from tqdm.auto import tqdm

        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault(self._decoding_key(gen_kwargs), []).append(i)
        bar = tqdm(total=len(requests), desc="dyllm generate_until", disable=disable_tqdm or self.rank != 0)
        try:
            for (gen_len, temperature), members in groups.items():
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    contexts = [self._fit_context(requests[i].args[0], gen_len) for i in batch]
                    texts = self._generate(contexts, gen_len, temperature)
                    for i, text in zip(batch, texts):
                        context, gen_kwargs = requests[i].args
                        results[i] = cut_at_stop(text, stop_strings(gen_kwargs))
                        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), results[i])
                    bar.update(len(batch))
        finally:
            bar.close()
        return results

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "dyllm").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def get_model_info(self) -> dict:
        """Added by lm-eval to the results' ``config``: the policy and what decoding cost."""
        s = self.stats
        active = s["active"]
        return {
            "dyllm_policy": self.policy,
            "dyllm_generations": s["generations"],
            "dyllm_nfe_per_generation": s["nfe"] / s["generations"] if s["generations"] else 0.0,
            "dyllm_tokens_per_s": s["tokens"] / s["seconds"] if s["seconds"] else 0.0,
            "dyllm_active_fraction": sum(active) / len(active) if active else 1.0,
        }

    # -- helpers ----------------------------------------------------------------------------

    def _decoding_key(self, gen_kwargs: dict) -> tuple[int, float]:
        """(gen_length, temperature) of a request: requests sharing it can share a batch."""
        gen_len = int(gen_kwargs.get("max_gen_toks", self.gen_length))
        temperature = float(gen_kwargs.get("temperature", self.temperature) or 0.0)
        if not gen_kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        return gen_len, temperature

    def _schedule(self, gen_len: int) -> tuple[int, int, int | None]:
        """gen_length (rounded up to whole blocks), block_length and steps for a window."""
        block = min(self.block_length, gen_len)
        gen_len = math.ceil(gen_len / block) * block
        if self.threshold is not None or self.steps_per_token is None:
            return gen_len, block, None
        blocks = gen_len // block
        steps = max(blocks, math.ceil(gen_len * self.steps_per_token / blocks) * blocks)
        return gen_len, block, steps

    def _fit_context(self, context: str, gen_len: int) -> str:
        """Left-truncate a context that, with the response window, exceeds the model's window."""
        window = getattr(self.model.diffusion, "max_length", None)
        if window is None:
            return context
        budget = window - self._schedule(gen_len)[0]
        ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        if budget < 1:
            raise ValueError(
                f"dyllm: max_gen_toks={gen_len} leaves no room for a prompt in the model's {window}-token "
                "window"
            )
        if len(ids) <= budget:
            return context
        log.warning(
            "dyllm: context of %d tokens truncated on the left to %d to fit the window", len(ids), budget
        )
        return self.tokenizer.decode(ids[-budget:])

    def _generate(self, contexts: Sequence[str], gen_len: int, temperature: float) -> list[str]:
        gen_len, block, steps = self._schedule(gen_len)
        out = generate(
            self.model,
            self.tokenizer,
            list(contexts),
            gen_length=gen_len,
            block_length=block,
            steps=steps,
            threshold=self.threshold,
            cfg_scale=self.cfg_scale,
            seed=self.seed,
            temperature=temperature,
            progress=False,
            **self.sampler_params,
        )
        s = self.stats
        s["generations"] += 1
        s["nfe"] += out.stats.nfe
        s["seconds"] += out.stats.seconds
        s["tokens"] += out.responses.numel()
        records = records_of(self.model)
        if records:
            s["active"].extend(r.active_fraction for r in records)
        return out.texts


def stop_strings(gen_kwargs: dict) -> list[str]:
    """The request's ``until`` as a list (lm-eval allows one string or a list)."""
    until = gen_kwargs.get("until") or []
    return [until] if isinstance(until, str) else [u for u in until if u]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]
