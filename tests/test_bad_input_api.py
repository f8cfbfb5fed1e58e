"""The Python API refuses bad input before any work, naming the fix (issue 30): numbers that
are not finite or not whole, seeds out of range, token ids outside the vocabulary, arguments
of the wrong kind (``policy=None``, a module that is not a language model, ``stop=5``) and an
unknown compile backend."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import dyllm_fx
from dyllm_fx import SamplingParams
from dyllm_fx.errors import UsageError
from dyllm_fx.serving import PromptError, PromptTooLongError
from tiny_checkpoints import tiny_dream, tiny_llada, tiny_tokenizer

TOK = tiny_tokenizer()
KW = dict(gen_length=8, block_length=8, progress=False)


@pytest.fixture(scope="module")
def llada():
    return tiny_llada(seed=0)


@pytest.fixture(scope="module")
def dream():
    return tiny_dream(seed=0)


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "arch, kwargs, exc, words",
    [
        ("llada", dict(temperature=float("nan")), ValueError, "temperature must be a finite number"),
        ("llada", dict(temperature=float("inf")), ValueError, "temperature must be a finite number"),
        ("llada", dict(temperature=True), TypeError, "temperature must be a number, got bool"),
        ("llada", dict(threshold=float("nan")), ValueError, "threshold must be a finite number"),
        ("llada", dict(cfg_scale=float("inf")), ValueError, "cfg_scale must be a finite number"),
        ("dream", dict(top_p=float("nan")), ValueError, "top_p must be a finite number"),
        ("dream", dict(alg_temp=float("-inf")), ValueError, "alg_temp must be a finite number"),
        ("dream", dict(top_k=0), ValueError, "top_k=None to turn top-k filtering off"),
        ("dream", dict(top_k=2.5), TypeError, "top_k must be an integer"),
        ("llada", dict(seed=1.7), TypeError, "seed must be an integer, got float 1.7"),
        ("llada", dict(seed=3.0), TypeError, "pass seed=3"),
        ("llada", dict(seed="42"), TypeError, "seed must be an integer, got str"),
        ("llada", dict(seed=2**70), ValueError, "seed must be in"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_generate_refuses_numbers_that_would_decode_silently_wrong(llada, dream, arch, kwargs, exc, words):
    model = llada if arch == "llada" else dream
    with pytest.raises(exc, match=words):
        dyllm_fx.generate(model, TOK, "ab", **KW, **kwargs)


def test_a_whole_float_seed_is_refused_not_truncated(llada):
    """1.7 used to run as seed 1: the same tokens as seed=1, with no word."""
    with pytest.raises(TypeError, match="a seed is a whole number"):
        dyllm_fx.generate(llada, TOK, "ab", seed=1.7, temperature=1.0, **KW)
    dyllm_fx.generate(llada, TOK, "ab", seed=-5, temperature=1.0, **KW)  # torch takes negative seeds


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite number"),
        (dict(temperature=float("inf")), ValueError, "temperature must be a finite number"),
        (dict(top_p=float("nan")), ValueError, "top_p must be a finite number"),
        (dict(threshold=float("inf")), ValueError, "threshold must be a finite number"),
        (dict(alg_temp=float("nan")), ValueError, "alg_temp must be a finite number"),
        (dict(temperature=True), TypeError, "temperature must be a number, got bool"),
        (dict(seed=1.5), TypeError, "seed must be an integer"),
        (dict(seed=2**64), ValueError, "seed must be in"),
        (dict(seed=2**64 - 1, n=2), ValueError, "seed must be in"),  # completion 1 would use 2**64
        (dict(n=1.0), TypeError, "pass n=1"),
        (dict(top_k=-2), ValueError, "-1 or 0 turns top-k off"),
        (dict(stop=5), TypeError, r"stop must be a string or a list of strings, got int 5; e\.g\. stop="),
        (dict(stop=["x", 5]), TypeError, "stop must be a string or a list of strings"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_sampling_params_refuse_bad_values_with_the_fix(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        SamplingParams(**kwargs)


def test_sampling_params_still_take_the_vllm_spellings():
    assert SamplingParams(top_k=-1, top_p=1.0, stop="\n", seed=-3).sampler_kwargs(dream=True)["top_k"] is None
    assert SamplingParams(top_k=0).sampler_kwargs(dream=True)["top_k"] is None


# --------------------------------------------------------------------------- token ids


@pytest.mark.parametrize("ids", [[5, 6, 10**6], [5, -1, 6], [5, 44]], ids=["huge", "negative", "vocab"])
def test_llm_refuses_prompt_ids_outside_the_vocabulary(llada, ids):
    llm = dyllm_fx.LLM(llada, tokenizer=TOK)
    bad = next(t for t in ids if not 0 <= t < 44)
    with pytest.raises(
        PromptError, match=rf"token id {bad} at position \d is outside the model's vocabulary"
    ):
        llm.generate([ids], SamplingParams(max_tokens=8, block_length=8))
    assert isinstance(PromptError("x"), ValueError)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, block_length=8))  # in range: decodes
    assert len(out[0].outputs[0].token_ids) == 8


def test_a_spec_mask_id_past_the_embedding_is_refused_before_the_first_step():
    model = tiny_llada(seed=0)
    model.diffusion = dataclasses.replace(model.diffusion, mask_token_id=1000)
    with pytest.raises(
        ValueError, match="mask_token_id token id 1000 .* outside the model's vocabulary"
    ) as err:
        dyllm_fx.generate(model, TOK, "ab", **KW)
    assert "DiffusionSpec" in str(err.value)


def test_a_prompt_with_no_room_for_a_response_says_so(llada):
    llm = dyllm_fx.LLM(llada, tokenizer=TOK)
    with pytest.raises(PromptTooLongError, match="leaves no room for a response") as err:
        llm.generate(["ab" * 70], SamplingParams(max_tokens=8, block_length=8))
    assert "at most -" not in str(err.value) and "shorten the prompt to at most 120 tokens" in str(err.value)
    with pytest.raises(PromptTooLongError, match=r"lower max_tokens \(at most 24 here\)"):
        llm.generate(["ab" * 50], SamplingParams(max_tokens=64, block_length=8))


# --------------------------------------------------------------------------- arguments of the wrong kind


def test_transform_names_the_policy_to_pass(llada):
    with pytest.raises(TypeError, match="policy must be a name .*dual_cache.*policy='dense'"):
        dyllm_fx.transform(llada, policy=None)


class _NoEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


class _NoAttentionMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, input_ids):
        return self.embed(input_ids)


@pytest.mark.parametrize(
    "module, words",
    [
        (nn.Linear(3, 3), "not a language model: it has no token embedding"),
        (_NoEmbedding(), "not a language model"),
        (_NoAttentionMask(), "does not take attention_mask="),
        ("a string", "model must be a torch module"),
    ],
    ids=["linear", "no-embedding", "no-mask", "string"],
)
def test_transform_refuses_a_module_that_is_not_a_language_model(module, words):
    if isinstance(module, nn.Module):
        module.train()  # the language-model check comes first, before "call model.eval()"
    with pytest.raises(TypeError, match=words) as err:
        dyllm_fx.transform(module)
    assert "dyllm_fx.load()" in str(err.value)


def test_an_unknown_compile_backend_is_refused_at_transform(llada, monkeypatch):
    from dyllm_fx.adapters.llada_dream import LLaDADreamAdapter

    def no_trace(*args, **kwargs):  # the backend is resolved before anything is traced
        raise AssertionError("traced before the backend was checked")

    monkeypatch.setattr(LLaDADreamAdapter, "capture", no_trace)
    with pytest.raises(UsageError, match="unknown compile backend 'inductr'.*inductor") as err:
        dyllm_fx.transform(llada, policy="dense", compile="inductr")
    assert "compile=True" in str(err.value)
    with pytest.raises(TypeError, match="compile must be True, False or a torch.compile backend name"):
        dyllm_fx.transform(llada, compile=1.5)


def test_a_known_compile_backend_is_accepted(llada):
    model = dyllm_fx.transform(llada, policy="dense", compile="aot_eager")
    assert model.engine.compiler.backend == "aot_eager"


def test_float_token_ids_still_fail_in_the_model_as_before(llada):
    with pytest.raises((TypeError, RuntimeError)):
        llada(torch.tensor([[1.0, 2.0]]))
