"""``dyllm_fx.load`` refuses a checkpoint folder that would load wrong or fail deep inside torch,
before it reads the weights, naming the file, the key and the fix (issue 30): config.json
settings of the wrong type or range, token ids past the vocabulary, a damaged tokenizer file,
NaN / infinite weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dyllm_fx
from dyllm_fx.models import CheckpointError


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "arch, changes, key, words",
    [
        ("llada", {"mask_token_id": 10**6}, "mask_token_id", "outside the vocabulary"),
        ("llada", {"eos_token_id": 44}, "eos_token_id", "outside the vocabulary"),
        ("dream", {"mask_token_id": -1}, "mask_token_id", "outside the vocabulary"),
        ("llada", {"n_heads": 2.5}, "n_heads", "must be an integer"),
        ("dream", {"num_attention_heads": 4.0}, "num_attention_heads", "pass num_attention_heads=4"),
        ("llada", {"d_model": "32"}, "d_model", "must be an integer"),
        ("llada", {"rope_theta": [10000]}, "rope_theta", "must be a number"),
        ("llada", {"vocab_size": True}, "vocab_size", "booleans are not numbers"),
        ("dream", {"tie_word_embeddings": "no"}, "tie_word_embeddings", "true or false"),
        ("llada", {"n_layers": 0}, "n_layers", "must be > 0"),
        ("llada", {"n_heads": 5}, "n_heads", "not a multiple"),
        ("dream", {"num_key_value_heads": 3}, "num_key_value_heads", "not a multiple"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_a_wrong_config_setting_names_the_key_and_the_file(
    tiny_llada_dir, tiny_dream_dir, arch, changes, key, words
):
    folder = tiny_llada_dir if arch == "llada" else tiny_dream_dir
    path = _edit_config(folder, **changes)
    (folder / "model.safetensors").unlink()  # refused before the weights are looked for
    with pytest.raises(CheckpointError) as err:
        dyllm_fx.load(folder, device="cpu")
    message = str(err.value)
    assert str(path) in message and key in message and words in message
    assert "fix it in config.json" in message


def test_a_corrupt_tokenizer_file_is_named(tiny_llada_dir):
    path = tiny_llada_dir / "tokenizer.json"
    path.write_text('{"version": "1.0", oops')
    with pytest.raises(CheckpointError, match="not valid JSON") as err:
        dyllm_fx.load(tiny_llada_dir, device="cpu")
    assert str(path) in str(err.value) and "copy it again" in str(err.value)


def test_a_tokenizer_file_that_parses_but_is_not_a_tokenizer_is_named(tiny_llada_dir):
    (tiny_llada_dir / "tokenizer.json").write_text('{"model": 5}')
    with pytest.raises(CheckpointError, match="cannot load the tokenizer") as err:
        dyllm_fx.load(tiny_llada_dir, device="cpu")
    assert "tokenizer.json" in str(err.value) and "copy them again" in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tiny_llada_dir, bad):
    path = tiny_llada_dir / "model.safetensors"
    state = load_file(str(path))
    key = "model.transformer.blocks.1.q_proj.weight"
    state[key][3, 4] = bad
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN or infinite") as err:
        dyllm_fx.load(tiny_llada_dir, device="cpu")
    assert key in str(err.value) and str(path) in str(err.value)


def test_weights_that_overflow_the_dtype_asked_for_say_so(tiny_llada_dir):
    path = tiny_llada_dir / "model.safetensors"
    state = load_file(str(path))
    key = "model.transformer.ln_f.weight"
    state[key][0] = 1e6  # beyond float16's range (65504)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="overflow torch.float16") as err:
        dyllm_fx.load(tiny_llada_dir, dtype="float16", device="cpu")
    assert key in str(err.value) and "bfloat16" in str(err.value)
    model, _ = dyllm_fx.load(tiny_llada_dir, dtype="float32", device="cpu")  # the fix works
    assert model.model.transformer.ln_f.weight.dtype == torch.float32


@pytest.mark.parametrize("given", [None, 3, ["default"]])
def test_load_of_something_that_is_not_a_path_names_the_fix(given):
    with pytest.raises(TypeError, match="must be a folder path or a name") as err:
        dyllm_fx.load(given)
    assert "'default'" in str(err.value)


def test_a_valid_folder_still_loads(tiny_llada_dir, tiny_dream_dir):
    for folder in (tiny_llada_dir, tiny_dream_dir):
        model, tok = dyllm_fx.load(folder, device="cpu")
        assert model.diffusion.mask_token_id == tok.mask_token_id
