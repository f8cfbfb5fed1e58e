"""``dyllm_fx.LLM``: vLLM's offline API over the serving engine. For example::

    from dyllm_fx import LLM, SamplingParams

    llm = LLM("default", policy="dual_cache+dyllm", tau=0.9)
    outs = llm.generate(["shift:abc...=", "rev:xyz...="], SamplingParams(max_tokens=64))
    print(outs[0].outputs[0].text, outs[0].metrics.nfe)

The engine and its scheduler are in ``engine.py`` and ``scheduler.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from ..adapters.llada2 import attention_block_length
from ..char_tokenizer import unknown_characters_message
from ..errors import UnknownCharactersWarning, UsageError
from .chat import render_chat
from .engine import ServingEngine
from .outputs import RequestOutput
from .params import SamplingParams


class LLM:
    """A diffusion LM ready to decode batches of prompts.

    Args:
        model: ``"default"`` (the embedded model), a model folder or a Hub id in the local
            cache (loaded with :func:`dyllm_fx.load`), or a model object (then pass
            ``tokenizer``): a loaded model, or a :class:`~dyllm_fx.TransformedModel`, used as it is.
        tokenizer: the tokenizer for a model object (a folder brings its own).
        policy: ``None`` / ``"vanilla"`` (the untransformed model, a full forward per step) or a
            :func:`dyllm_fx.transform` policy: ``"dual_cache"``, ``"dual_cache+dyllm"``, ...
        compile: compile each step with inductor (``transform(compile=...)``); each batch shape
            compiles once, so serving with many shapes recompiles often.
        cuda_graphs: replay each step as a CUDA graph (``transform(cuda_graphs=...)``).
        max_num_seqs: completions decoding at once (DyLLM's engine: 16).
        max_num_batches: batches with different block clocks (block length, steps per block)
            decoding side by side.
        max_queue_size: completions that may wait (None: unbounded).
        dtype, device: as :func:`dyllm_fx.load`.
        tensor_parallel_size: shard the model over this many ranks (``transform(...,
            tensor_parallel_size=N)``); every rank constructs the LLM and calls ``generate`` with
            the same prompts, and every rank gets the same outputs. Without a policy the model
            runs as ``"dense"`` (the untransformed model's tokens, through the compiler).
        **policy_config: the policy's parameters (``tau=0.9``, ...).

    :meth:`generate` and :meth:`chat` run the scheduler in the calling thread until their
    requests finish; the object is not meant to be shared between threads (the HTTP server,
    ``dyllm serve``, runs the engine in a thread of its own).
    """

    def __init__(
        self,
        model="default",
        tokenizer=None,
        policy: str | None = None,
        compile: bool | str = False,
        cuda_graphs: bool = False,
        max_num_seqs: int = 16,
        max_num_batches: int = 4,
        max_queue_size: int | None = None,
        dtype=None,
        device=None,
        tensor_parallel_size: int = 1,
        **policy_config,
    ):
        from ..transform import TransformedModel, transform

        if isinstance(model, str) or hasattr(model, "__fspath__"):
            if tokenizer is not None:
                raise UsageError(
                    "pass tokenizer= only with a model object; a model folder brings its own tokenizer"
                )
            from ..loading import load

            self.model_name = str(model)
            model, tokenizer = load(
                model, dtype=dtype, device=device, tensor_parallel_size=tensor_parallel_size
            )
        else:
            if tokenizer is None:
                raise UsageError("a model object needs its tokenizer: LLM(model, tokenizer=tokenizer)")
            if dtype is not None or device is not None:
                raise UsageError(
                    "dtype= and device= apply when LLM loads a folder; move a model object yourself "
                    "(model.to(...))"
                )
            self.model_name = type(model).__name__
        if attention_block_length(model) is not None:
            raise UsageError(
                f"{type(model).__name__} is a block-diffusion model (LLaDA2), decoded by its own block loop, "
                "which the serving scheduler does not run; generate with dyllm_fx.generate(model, tokenizer, "
                "prompts) or `dyllm generate --model FOLDER`"
            )
        self.base_model = model
        if isinstance(model, TransformedModel):
            if (
                policy not in (None, model.policy.name)
                or policy_config
                or compile
                or cuda_graphs
                or tensor_parallel_size != 1
            ):
                raise UsageError(
                    f"model is already transformed (policy {model.policy.name!r}); pass the original model "
                    "to choose a policy, compile, cuda_graphs or tensor_parallel_size here"
                )
        elif policy not in (None, "vanilla") or tensor_parallel_size != 1:
            model = transform(
                model,
                policy=policy if policy not in (None, "vanilla") else "dense",
                compile=compile,
                cuda_graphs=cuda_graphs,
                tensor_parallel_size=tensor_parallel_size,
                **policy_config,
            )
        elif policy_config or compile or cuda_graphs:
            raise UsageError(
                "policy parameters, compile and cuda_graphs need a policy (e.g. policy='dual_cache')"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.engine = ServingEngine(model, tokenizer, max_num_seqs, max_num_batches, max_queue_size)

    @property
    def policy_name(self) -> str:
        return self.engine.policy_name

    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Decode every prompt; returns one :class:`RequestOutput` per prompt, in order.

        ``prompts``: a string, a list of strings, or a list of token-id lists.
        ``sampling_params``: one :class:`SamplingParams` for all, or one per prompt (default:
        ``SamplingParams()``). Prompts beyond ``max_num_seqs`` wait and join running batches
        at their block boundaries.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; pass a string or a non-empty list of prompts")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one, or one per "
                    "prompt"
                )
        self._warn_unknown([p for p in prompts if isinstance(p, str)])
        requests = [self.engine.make_request(p, sp) for p, sp in zip(prompts, params)]
        return self.engine.run(requests)

    def chat(
        self,
        messages: Sequence[dict] | Sequence[Sequence[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Decode a conversation (a list of ``{"role", "content"}`` dicts) or a list of them,
        with the tokenizer's chat template; a tokenizer without one (the embedded model's)
        gets the trivial template: the contents concatenated (``dyllm_fx.serving.chat``)."""
        if not isinstance(messages, Sequence) or not messages:
            raise ValueError(
                "messages must be a non-empty list of {'role', 'content'} dicts, or a list of such lists"
            )
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        return self.generate([render_chat(self.tokenizer, c) for c in conversations], sampling_params)

    def _warn_unknown(self, prompts: list[str]) -> None:
        if not prompts:
            return
        ids = [self.engine.tokenize(p) for p in prompts]
        message = unknown_characters_message(self.tokenizer, prompts, ids)
        if message:
            warnings.warn(message, UnknownCharactersWarning, stacklevel=3)


__all__ = ["LLM"]
