"""The Dream family (Dream-v0, DiffuCoder, Dream-Coder) and MMaDA's language model load as their
checkpoints are published: tiny folders with each family's real config.json fields (sizes scaled
down), real key names, its generation_config.json and its tokenizer files; the logits match the
plain reference forward of test_models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dyllm_fx
from dyllm_fx.generation import default_sampler
from dyllm_fx.models import CheckpointError, MMaDAModelLM, model_config_dict
from dyllm_fx.prompts import encode_prompts
from test_models import llada_keys, random_ids, ref_forward
from tiny_checkpoints import tiny_dream, tiny_llada, tiny_tokenizer, write_model

VOCAB = len(tiny_tokenizer())
TOK = tiny_tokenizer()
# A ChatML template as Qwen2.5-based Instruct checkpoints ship it (DiffuCoder, Dream-Coder,
# Dream-v0-Instruct), shortened: the test checks that the shipped one is the one applied.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The config.json fields the published Dream-family checkpoints carry (transformers' Qwen2
# config plus Dream's mask id), at test sizes; each family's differences below.
DREAM_FIELDS = {
    "architectures": ["DreamModel"],
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_window_layers": 2,
    "model_type": "Dream",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": VOCAB,
    "bos_token_id": TOK.eos_token_id,
    "eos_token_id": TOK.eos_token_id,
    "pad_token_id": TOK.pad_token_id,
    "mask_token_id": TOK.mask_token_id,
}
# Per family: what its config.json / generation_config.json set differently (the ids are the
# tiny vocabulary's; 5 stands for an Instruct model's <|im_end|>).
FAMILIES = {
    "dream-v0-instruct": ({"max_position_embeddings": 131072}, {"eos_token_id": TOK.eos_token_id}),
    "diffucoder-instruct": (
        {"max_position_embeddings": 32768, "use_cache": False},
        {
            "eos_token_id": [5, TOK.eos_token_id],
            "alg": "entropy",
            "alg_temp": 0.0,
            "temperature": 0.4,
            "top_p": 0.95,
        },
    ),
    "dream-coder-instruct": (
        {"max_position_embeddings": 32768, "tie_word_embeddings": False},
        {"eos_token_id": [5], "alg": "maskgit_plus", "temperature": 0.1, "top_p": 0.95, "steps": 768},
    ),
}


def write_dream_family(folder: Path, config: dict, generation: dict | None, remote_tokenizer=True) -> Path:
    """A Dream-family folder: the weights under Qwen2 keys, the published config fields, the
    tokenizer with a tokenizer_config.json that names Dream's remote-code tokenizer class and
    ships a chat template, and the generation config."""
    write_model(
        tiny_dream(seed=3, max_position_embeddings=config.get("max_position_embeddings", 128)), folder
    )
    (folder / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    cfg_file = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    tok_cfg["chat_template"] = CHATML
    if remote_tokenizer:
        tok_cfg["tokenizer_class"] = "DreamTokenizer"
        tok_cfg["auto_map"] = {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}
    cfg_file.write_text(json.dumps(tok_cfg))
    return folder


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dream_family_loads_as_published(tmp_path, family):
    config_changes, generation = FAMILIES[family]
    folder = write_dream_family(tmp_path / family, {**DREAM_FIELDS, **config_changes}, generation)
    model, tok = dyllm_fx.load(folder)
    ids = random_ids(2, 9, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref_forward(model, ids), atol=1e-4, rtol=1e-4)
    spec = model.diffusion
    assert spec.logits_shift == 1 and spec.mask_token_id == TOK.mask_token_id
    assert spec.max_length == config_changes["max_position_embeddings"]
    eos = generation["eos_token_id"]
    assert spec.eos_token_ids == tuple(
        dict.fromkeys([TOK.eos_token_id, *(eos if isinstance(eos, list) else [eos])])
    )
    want = {k: generation[k] for k in ("alg", "alg_temp", "temperature", "top_p") if k in generation}
    assert dict(spec.sampler_defaults) == want  # steps is not a sampler setting: generate's own argument
    sampler = default_sampler(model)
    for key, value in want.items():
        assert getattr(sampler, key) == value
    assert default_sampler(model, temperature=0.0).temperature == 0.0  # the caller wins
    # the shipped chat template, although the folder's tokenizer class needs remote code
    texts, _, _ = encode_prompts(tok, ["abc"], chat=True, device=torch.device("cpu"))
    assert texts == ["<|im_start|>user\nabc<|im_end|>\n<|im_start|>assistant\n"]


def test_a_checkpoint_without_generation_config_keeps_the_defaults(tmp_path):
    folder = write_dream_family(tmp_path / "base", {**DREAM_FIELDS, "max_position_embeddings": 128}, None)
    model, _ = dyllm_fx.load(folder)
    assert model.diffusion.sampler_defaults == () and model.diffusion.eos_token_ids == (TOK.eos_token_id,)
    assert default_sampler(model).alg == "entropy"


@pytest.mark.parametrize(
    "generation, match",
    [
        ({"alg": "confidence_threshold"}, "alg must be one of"),
        ({"top_p": 1.5}, "top_p"),
        ({"eos_token_id": "<|im_end|>"}, "eos_token_id"),
    ],
)
def test_an_unsupported_generation_setting_is_refused_before_the_weights(tmp_path, generation, match):
    folder = write_dream_family(
        tmp_path / "bad", {**DREAM_FIELDS, "max_position_embeddings": 128}, generation
    )
    (folder / "model.safetensors").unlink()  # the error must come first
    with pytest.raises(CheckpointError, match=match) as err:
        dyllm_fx.load(folder)
    assert "generation_config.json" in str(err.value)


def test_sliding_window_attention_is_refused(tmp_path):
    config = {**DREAM_FIELDS, "max_position_embeddings": 128, "use_sliding_window": True, "sliding_window": 8}
    folder = write_dream_family(tmp_path / "sw", config, None)
    with pytest.raises(ValueError, match="use_sliding_window"):
        dyllm_fx.load(folder)


# MMaDA-8B's config.json: LLaDA's OLMo fields with the vocabulary widened for image codes
# (vocab_size = embedding_size = new_vocab_size = llm_vocab_size + codebook_size) and
# model_type mmada; at test sizes: the 44 text ids, then 12 image codes.
CODES = 12
MMADA_FIELDS = {
    "architectures": ["MMadaModelLM"],
    "model_type": "mmada",
    "activation_type": "silu",
    "alibi": False,
    "attention_layer_norm": False,
    "block_type": "llama",
    "d_model": 32,
    "embedding_size": VOCAB + CODES,
    "include_bias": False,
    "include_qkv_bias": False,
    "layer_norm_type": "rms",
    "mlp_hidden_size": 64,
    "max_sequence_length": 128,
    "n_heads": 4,
    "n_kv_heads": 4,
    "n_layers": 2,
    "rope": True,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-05,
    "vocab_size": VOCAB + CODES,
    "weight_tying": False,
    "llm_vocab_size": VOCAB,
    "new_vocab_size": VOCAB + CODES,
    "codebook_size": CODES,
    "num_vq_tokens": 16,
    "num_new_special_tokens": 0,
    "w_clip_vit": False,
    "mask_token_id": TOK.mask_token_id,
    "eos_token_id": TOK.eos_token_id,
    "pad_token_id": TOK.pad_token_id,
}


def write_mmada(folder: Path, **changes) -> Path:
    model = tiny_llada(seed=5, vocab_size=VOCAB + CODES, embedding_size=VOCAB + CODES, rope_theta=500000.0)
    write_model(model, folder)
    (folder / "config.json").write_text(json.dumps({**MMADA_FIELDS, **changes}))
    return folder


def test_mmada_loads_under_llada_keys_and_matches_the_reference(tmp_path):
    folder = write_mmada(tmp_path / "mmada")
    model, _ = dyllm_fx.load(folder)
    assert isinstance(model, MMaDAModelLM) and set(model.state_dict()) == llada_keys(2)
    assert model.diffusion.mask_token_id == TOK.mask_token_id and model.diffusion.logits_shift == 0
    ids = random_ids(2, 9, seed=6)
    with torch.no_grad():
        logits = model(ids)
        torch.testing.assert_close(logits, ref_forward(model, ids), atol=1e-4, rtol=1e-4)
    assert logits.shape[-1] == VOCAB + CODES  # every logit, image codes included, as MMaDA's generate.py
    saved = model_config_dict(model)
    assert saved["model_type"] == "mmada" and saved["llm_vocab_size"] == VOCAB


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"mask_token_id": VOCAB + 3}, "mask_token_id=.* is outside the vocabulary .llm_vocab_size"),
        ({"llm_vocab_size": VOCAB + CODES + 1}, "llm_vocab_size=.* is larger than the embedding"),
    ],
)
def test_mmada_config_checks(tmp_path, changes, match):
    folder = write_mmada(tmp_path / "bad", **changes)
    (folder / "model.safetensors").unlink()  # refused before the weights are read
    with pytest.raises(CheckpointError, match=match):
        dyllm_fx.load(folder)


def test_mmada_missing_keys_name_the_fix(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_mmada(tmp_path / "cut")
    state = load_file(str(folder / "model.safetensors"))
    del state["model.transformer.blocks.1.ff_out.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys .*blocks.1.ff_out.*config.json belongs"):
        dyllm_fx.load(folder)


def test_the_command_line_leaves_the_checkpoints_temperature_alone_unless_given():
    from dyllm_fx.cli.common_args import decoding_kwargs
    from dyllm_fx.cli.main import build_parser

    assert "temperature" not in decoding_kwargs(build_parser().parse_args(["generate", "x"]))
    given = build_parser().parse_args(["generate", "x", "--temperature", "0.5"])
    assert decoding_kwargs(given)["temperature"] == 0.5
