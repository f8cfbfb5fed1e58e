"""LLaDA-MoE: a tiny checkpoint written with the published key names and config fields (dense
first layer, routed experts with an expert bias and a shared expert, QK norm, q/k/v/o biases,
grouped-query attention) loads through ``dyllm_fx.load`` and gives the logits of a plain
forward written from the published modeling code; every policy runs on it, and at its
keep-everything parameters gives the untransformed model's tokens."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

import dyllm_fx
from dyllm_fx.models import CheckpointError, LLaDAMoEModelLM, save_model
from dyllm_fx.models.checkpoint import INDEX_FILE
from dyllm_fx.runtime.policies import make_policy
from dyllm_fx.transform import TransformedModel
from policy_helpers import COMPOSED, NAMES
from reference_llada_moe import llada_moe_logits
from tiny_checkpoints import tiny_tokenizer

HIDDEN, HEADS, KV_HEADS, EXPERTS, TOP_K = 32, 4, 2, 6, 2
# Each row policy's parameters that recompute every row of the sequence at every step: the
# untransformed model's tokens (as tests/test_policy_*.py check on LLaDA and Dream).
VANILLA_EXACT = {
    "dense": {},
    "dyllm": {"every_row": True, "full_query_interval": 1},
    "es_dllm": {"proportion_steps": ((1.0, 0.0),), "scope": "all", "delay_eos": False},
    "dllm_cache": {"ratio": 1.0, "scope": "all"},
}


def tiny_config(**overrides) -> dict:
    tok = tiny_tokenizer()
    cfg = {
        "model_type": "lladamoe",
        "architectures": ["LLaDAMoEModelLM"],
        "hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": 3,
        "vocab_size": len(tok),
        "dense_intermediate_size": 48,
        "expert_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "num_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "moe_layer_freq": [0, 1, 1],
        "moe_router_enable_expert_bias": True,
        "norm_topk_prob": True,  # the published block ignores it: never renormalised
        "qk_layernorm": True,
        "attention_bias": True,
        "hidden_act": "silu",
        "partial_rotary_factor": 1,
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "mask_token_id": tok.mask_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    cfg.update(overrides)
    return cfg


def checkpoint_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every key of a LLaDA-MoE checkpoint with its shape, from the published module layout."""
    d, hd = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,)}
    shapes["lm_head.weight"] = (cfg["vocab_size"], d)

    def mlp(prefix, inner):
        shapes.update(
            {
                f"{prefix}.gate_proj.weight": (inner, d),
                f"{prefix}.up_proj.weight": (inner, d),
                f"{prefix}.down_proj.weight": (d, inner),
            }
        )

    for i, moe in enumerate(cfg["moe_layer_freq"]):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (d,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
        for name, out in (("q_proj", d), ("k_proj", kv), ("v_proj", kv), ("o_proj", d)):
            shapes[f"{p}.self_attn.{name}.weight"] = (out, d)
            shapes[f"{p}.self_attn.{name}.bias"] = (out,)
        shapes[f"{p}.self_attn.q_norm.weight"] = (hd,)
        shapes[f"{p}.self_attn.k_norm.weight"] = (hd,)
        if not moe:
            mlp(f"{p}.mlp", cfg["dense_intermediate_size"])
            continue
        shapes[f"{p}.mlp.gate.weight"] = (cfg["num_experts"], d)
        shapes[f"{p}.mlp.expert_bias"] = (cfg["num_experts"],)
        for e in range(cfg["num_experts"]):
            mlp(f"{p}.mlp.experts.{e}", cfg["expert_intermediate_size"])
        mlp(f"{p}.shared_expert", cfg["shared_expert_intermediate_size"])
    return shapes


def random_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in checkpoint_shapes(cfg).items():
        if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif key.endswith("expert_bias"):
            state[key] = 0.05 * torch.randn(shape, generator=gen)
        else:
            state[key] = 0.3 * torch.randn(shape, generator=gen)
    state["lm_head.weight"] *= 3.0  # wide logit gaps: no near-ties between runs that should agree
    return state


def write_checkpoint(folder, cfg: dict, state: dict, shards: int = 1):
    """config.json, ``shards`` safetensors files (with an index when more than one), tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[s::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    if shards > 1:
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = tiny_config()
    state = random_state(cfg)
    folder = write_checkpoint(tmp_path_factory.mktemp("llada-moe"), cfg, state, shards=3)
    return folder, cfg, state


@pytest.fixture(scope="module")
def loaded(checkpoint):
    folder = checkpoint[0]
    return dyllm_fx.load(str(folder), dtype="float32")


@pytest.fixture(scope="module")
def traced(loaded):
    """The model's step program, traced once; each test gives it a policy of its own."""
    return dyllm_fx.transform(loaded[0])


def with_policy(traced, name: str, **params) -> TransformedModel:
    return TransformedModel(traced.program, make_policy(name, **params), traced.diffusion)


def test_the_architecture_is_picked_from_the_config(loaded):
    model, _ = loaded
    assert isinstance(model, LLaDAMoEModelLM)
    assert model.diffusion.logits_shift == 0
    assert model.diffusion.mask_token_id == tiny_tokenizer().mask_token_id


def test_logits_equal_the_published_forward(checkpoint, loaded):
    _, cfg, state = checkpoint
    model, _ = loaded
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
    want = llada_moe_logits(state, cfg, ids, mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-4


def test_saving_writes_the_published_keys(checkpoint, loaded, tmp_path):
    _, cfg, state = checkpoint
    model, _ = loaded
    save_model(model, tmp_path / "again")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"moe_layer_freq": [1, 1]}, "moe_layer_freq must list one 0 (dense) or 1 (experts) per layer, 3"),
        ({"num_experts": 2.5}, "num_experts"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
        ({"clip_qkv": 8.0}, "clip_qkv"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_configs_are_refused_by_name(tmp_path, overrides, message):
    cfg = tiny_config(**overrides)
    write_checkpoint(tmp_path, cfg, random_state(tiny_config()))
    with pytest.raises((CheckpointError, ValueError), match=re.escape(message)):
        dyllm_fx.load(str(tmp_path), dtype="float32")


def test_a_missing_expert_is_named(tmp_path):
    cfg = tiny_config()
    state = random_state(cfg)
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    write_checkpoint(tmp_path, cfg, state)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        dyllm_fx.load(str(tmp_path), dtype="float32")


def _generate(model, tokenizer, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a window other than a trained one warns
        out = dyllm_fx.generate(
            model, tokenizer, ["abc", "hello w"], gen_length=16, block_length=8, stop_at_eos=False, **settings
        )
    return out.responses


@pytest.mark.parametrize("name", sorted(VANILLA_EXACT))
def test_each_policy_recomputing_every_row_gives_the_model_tokens(loaded, traced, name):
    model, tokenizer = loaded
    exact = with_policy(traced, name, **VANILLA_EXACT[name])
    assert torch.equal(_generate(exact, tokenizer, steps=16), _generate(model, tokenizer, steps=16))


@pytest.mark.parametrize("name", [n for n in NAMES + COMPOSED if n != "fixed"])
def test_every_policy_runs_at_its_defaults(loaded, traced, name):
    got = _generate(with_policy(traced, name), loaded[1], threshold=0.9)
    assert got.shape == (2, 16)
