"""dyllm_fx.loading.load on Hugging Face style folders: formats, architecture pick, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PretrainedConfig

from dyllm_fx.loading import load, load_tokenizer
from dyllm_fx.models import CheckpointError, DreamModel, LLaDAModelLM
from tiny_checkpoints import tiny_dream, tiny_llada, write_tiny_dream, write_tiny_llada

PROMPT = "rev:hello,world=42?"
ARCHS = {
    "llada": (write_tiny_llada, tiny_llada, LLaDAModelLM),
    "dream": (write_tiny_dream, tiny_dream, DreamModel),
}


def ids_for(tok, text: str = PROMPT) -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_load_matches_in_memory_model(tmp_path, arch, sharded):
    write, make, cls = ARCHS[arch]
    folder = write(tmp_path / arch, sharded=sharded, seed=3)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if sharded:
        assert len(shards) > 1
        assert (folder / "model.safetensors.index.json").is_file()
        assert not (folder / "model.safetensors").exists()
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(weight_map.values()) == {s.name for s in shards}
    else:
        assert shards == [] and (folder / "model.safetensors").is_file()

    model, tok = load(folder, device="cpu")
    assert isinstance(model, cls)
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    reference = make(seed=3)
    ids = ids_for(tok)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), atol=0, rtol=0)
    # A different seed gives different logits, so the equality above is not vacuous.
    with torch.no_grad():
        assert (make(seed=4)(ids) - reference(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tokenizer_round_trip(tmp_path, arch, tiny_tokenizer):
    folder = ARCHS[arch][0](tmp_path / arch)
    model, tok = load(folder, device="cpu")
    ids = tok(PROMPT)["input_ids"]
    assert ids == tiny_tokenizer(PROMPT)["input_ids"]  # same vocabulary as the tokenizer that was saved
    assert len(ids) == len(PROMPT)  # one token per character, no BOS/EOS added
    assert tok.decode(ids) == PROMPT
    assert tok.mask_token_id == model.diffusion.mask_token_id
    assert tok.pad_token_id == model.diffusion.pad_token_id
    assert tok.padding_side == "left"
    batch = tok([PROMPT, "ab"], padding=True)
    assert batch["attention_mask"][1][:2] == [0, 0] and batch["attention_mask"][1][-2:] == [1, 1]


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("keep", ["model_type", "architectures"])
def test_architecture_from_either_config_field(tmp_path, arch, keep):
    write, _, cls = ARCHS[arch]
    folder = write(tmp_path / arch)
    dropped = "architectures" if keep == "model_type" else "model_type"
    edit_config(folder, **{dropped: None})
    assert dropped not in json.loads((folder / "config.json").read_text())
    model, _ = load(folder, device="cpu")
    assert isinstance(model, cls)


def test_unknown_architecture(tiny_llada_dir):
    edit_config(tiny_llada_dir, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match="gpt2") as err:
        load(tiny_llada_dir, device="cpu")
    assert "GPT2LMHeadModel" in str(err.value)


def test_missing_key(tiny_llada_dir):
    key = "model.transformer.blocks.1.up_proj.weight"
    rewrite_weights(tiny_llada_dir, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match="missing") as err:
        load(tiny_llada_dir, device="cpu")
    assert key in str(err.value)


def test_unexpected_key(tiny_dream_dir):
    key = "model.layers.0.self_attn.o_proj.bias"
    rewrite_weights(tiny_dream_dir, lambda s: s.__setitem__(key, torch.zeros(32)))
    with pytest.raises(CheckpointError, match="unexpected") as err:
        load(tiny_dream_dir, device="cpu")
    assert key in str(err.value)


def test_misshaped_key(tiny_dream_dir):
    key = "model.layers.1.self_attn.k_proj.weight"
    rewrite_weights(tiny_dream_dir, lambda s: s.__setitem__(key, torch.zeros(32, 32)))
    with pytest.raises(CheckpointError, match="mis-shaped") as err:
        load(tiny_dream_dir, device="cpu")
    msg = str(err.value)
    assert key in msg
    assert "(32, 32)" in msg and "(16, 32)" in msg  # checkpoint shape vs model shape


def test_shard_index_naming_absent_file(tmp_path):
    folder = write_tiny_llada(tmp_path / "m", sharded=True)
    victim = sorted(folder.glob("model-*-of-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load(folder, device="cpu")


def test_missing_config(tiny_llada_dir):
    (tiny_llada_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tiny_llada_dir, device="cpu")


def test_nonexistent_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load(missing, device="cpu")
    msg = str(err.value)
    assert str(missing) in msg and "config.json" in msg and "never downloads" in msg


def test_bin_only_folder(tiny_llada_dir):
    state = load_file(str(tiny_llada_dir / "model.safetensors"))
    (tiny_llada_dir / "model.safetensors").unlink()
    torch.save(state, tiny_llada_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"\.bin") as err:
        load(tiny_llada_dir, device="cpu")
    assert "safe_serialization=True" in str(err.value)


def test_folder_without_weights(tiny_llada_dir):
    (tiny_llada_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load(tiny_llada_dir, device="cpu")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_dtype_argument(tmp_path, arch):
    write, make, _ = ARCHS[arch]
    folder = write(tmp_path / arch)
    model, tok = load(folder, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = ids_for(tok)
    with torch.no_grad():
        out = model(ids)
        ref = make()(ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.3, rtol=0.05)


def test_default_dtype_on_cpu(tiny_dream_dir):
    if torch.cuda.is_available():
        pytest.skip("default device is CUDA here")
    model, _ = load(tiny_dream_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_remote_code_tokenizer_falls_back_to_tokenizer_json(tiny_dream_dir):
    cfg_path = tiny_dream_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "DreamTokenizer"
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}
    cfg_path.write_text(json.dumps(cfg))
    # The folder's own class needs remote code, which is never run ...
    with pytest.raises((ValueError, OSError, KeyError)):
        AutoTokenizer.from_pretrained(
            str(tiny_dream_dir), local_files_only=True, trust_remote_code=False, config=PretrainedConfig()
        )
    # ... yet load_tokenizer and load still give a working tokenizer.
    tok = load_tokenizer(tiny_dream_dir)
    assert tok.decode(tok(PROMPT)["input_ids"]) == PROMPT
    model, tok2 = load(tiny_dream_dir, device="cpu")
    assert tok2(PROMPT)["input_ids"] == tok(PROMPT)["input_ids"]
    for t in (tok, tok2):
        assert t.mask_token_id == model.diffusion.mask_token_id
        assert t.eos_token_id == model.diffusion.eos_token_ids[0]
        assert t.pad_token_id == model.diffusion.pad_token_id
        assert t.padding_side == "left"


def test_folder_without_tokenizer(tiny_llada_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_llada_dir / name).unlink()
    with pytest.raises(
        CheckpointError, match="has no tokenizer files.*copy them from the original checkpoint"
    ):
        load(tiny_llada_dir, device="cpu")


def test_embedded_models_by_name():
    from dyllm_fx.export.metadata import model_path_label
    from dyllm_fx.loading import EMBEDDED_MODELS, default_model_path, embedded_model_name, resolve_model_path

    assert set(EMBEDDED_MODELS) == {"default", "default-dream"}
    for name in EMBEDDED_MODELS:
        folder = default_model_path(name)
        assert folder.parent.name == "assets"
        if (folder / "config.json").is_file():
            assert resolve_model_path(name) == folder
        else:  # not shipped in this install: the error names the command that trains it
            with pytest.raises(
                FileNotFoundError,
                match=r"not in this install.*train_tiny_mdlm.py --arch \w+ --out "
                rf"{re.escape(str(folder.relative_to(folder.parents[2])))}",
            ):
                resolve_model_path(name)
        assert embedded_model_name(name) == name and embedded_model_name(folder) == name
        assert model_path_label(folder) == name and model_path_label(name) == name
    assert default_model_path() == default_model_path("default")
    assert embedded_model_name("/no/such/folder") is None
    with pytest.raises(KeyError, match="default-dream"):
        default_model_path("default-llama")
    for name in EMBEDDED_MODELS:
        if (default_model_path(name) / "config.json").is_file():
            model, tok = load(name)
            assert model.architecture == ("dream" if name == "default-dream" else "llada")
            assert model.diffusion.logits_shift == (1 if name == "default-dream" else 0)
            assert tok.mask_token_id == model.diffusion.mask_token_id
