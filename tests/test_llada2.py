"""LLaDA2 (BailingMoeV2): a tiny checkpoint written with the published key names and config
fields (a dense first layer, a fused query/key/value projection, QK norm, partial RoPE, grouped
routing with an expert bias and a shared expert) loads through ``dyllm_fx.load`` and gives the
logits of a plain forward written from the published modeling code, under the block-causal mask;
bad checkpoints are refused by name. Generation follows the published block loop token for
token; the exact policies (and the block caches, exact for a block-causal model) keep its
tokens, every policy runs inside the block, and eager equals compiled."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import dyllm_fx
from dyllm_fx.errors import UsageError
from dyllm_fx.models import CheckpointError, LLaDA2ModelLM, save_model
from dyllm_fx.models.checkpoint import INDEX_FILE
from dyllm_fx.models.llada2 import block_causal_mask, random_model, tiny_random_config
from dyllm_fx.passes.check_bidirectional import is_causal_mask
from dyllm_fx.runtime.policies import make_policy
from dyllm_fx.transform import TransformedModel
from policy_helpers import COMPOSED, NAMES
from reference_llada2 import llada2_generate, llada2_logits
from tiny_checkpoints import tiny_tokenizer

BLOCK = 4


def tiny_config(**overrides) -> dict:
    tok = tiny_tokenizer()
    cfg = tiny_random_config(len(tok), tok.mask_token_id, tok.eos_token_id)
    cfg.update(pad_token_id=tok.pad_token_id, block_length=BLOCK, use_bias=True, use_qkv_bias=True)
    cfg.update(overrides)
    return cfg


def checkpoint_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every key of a LLaDA2 checkpoint with its shape, from the published module layout."""
    d, hd = cfg["hidden_size"], cfg["head_dim"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.word_embeddings.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,)}
    shapes["lm_head.weight"] = (cfg["vocab_size"], d)

    def mlp(prefix, inner):
        shapes[f"{prefix}.gate_proj.weight"] = (inner, d)
        shapes[f"{prefix}.up_proj.weight"] = (inner, d)
        shapes[f"{prefix}.down_proj.weight"] = (d, inner)

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (d,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
        shapes[f"{p}.attention.query_key_value.weight"] = ((heads + 2 * kv) * hd, d)
        shapes[f"{p}.attention.query_key_value.bias"] = ((heads + 2 * kv) * hd,)
        shapes[f"{p}.attention.query_layernorm.weight"] = (hd,)
        shapes[f"{p}.attention.key_layernorm.weight"] = (hd,)
        shapes[f"{p}.attention.dense.weight"] = (d, heads * hd)
        shapes[f"{p}.attention.dense.bias"] = (d,)
        if i < cfg["first_k_dense_replace"]:
            mlp(f"{p}.mlp", cfg["intermediate_size"])
            continue
        shapes[f"{p}.mlp.gate.weight"] = (cfg["num_experts"], d)
        shapes[f"{p}.mlp.gate.expert_bias"] = (cfg["num_experts"],)
        for e in range(cfg["num_experts"]):
            mlp(f"{p}.mlp.experts.{e}", cfg["moe_intermediate_size"])
        mlp(f"{p}.mlp.shared_experts", cfg["moe_intermediate_size"] * cfg["num_shared_experts"])
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
    folder = write_checkpoint(tmp_path_factory.mktemp("llada2"), cfg, state, shards=2)
    return folder, cfg, state


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return dyllm_fx.load(str(checkpoint[0]), dtype="float32")


def test_the_architecture_is_picked_from_the_config(loaded):
    model, _ = loaded
    assert isinstance(model, LLaDA2ModelLM)
    assert model.attention_block_length == BLOCK
    assert model.diffusion.logits_shift == 0
    assert model.diffusion.mask_token_id == tiny_tokenizer().mask_token_id


def test_logits_equal_the_published_forward(checkpoint, loaded):
    _, cfg, state = checkpoint
    model, _ = loaded
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row: its blocks count from its first real token
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
    want = llada2_logits(state, cfg, ids, mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-4


def test_attention_is_block_causal(checkpoint, loaded):
    """Tokens of a later block change nothing before it; tokens inside a block change the block."""
    model, _ = loaded
    ids = torch.randint(
        0, checkpoint[1]["vocab_size"], (1, 3 * BLOCK), generator=torch.Generator().manual_seed(2)
    )
    changed = ids.clone()
    changed[0, 2 * BLOCK + 1] = (ids[0, 2 * BLOCK + 1] + 1) % checkpoint[1]["vocab_size"]
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[0, : 2 * BLOCK], b[0, : 2 * BLOCK])
    assert not torch.allclose(a[0, 2 * BLOCK], b[0, 2 * BLOCK])


def test_saving_writes_the_published_keys(checkpoint, loaded, tmp_path):
    _, _, state = checkpoint
    model, _ = loaded
    save_model(model, tmp_path / "again")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_experts": 6}, "num_experts=6 is not a multiple of n_group=4"),
        ({"n_group": 8}, "each of the n_group=8 expert groups needs 2 or more experts"),
        ({"topk_group": 1, "num_experts_per_tok": 3}, "num_experts_per_tok=3 must be at most"),
        ({"score_function": "softmax"}, "score_function"),
        ({"use_qk_norm": False}, "use_qk_norm"),
        ({"partial_rotary_factor": 0.1}, "RoPE needs an even number"),
        ({"rotary_dim": 8}, "rotary_dim=8 disagrees with partial_rotary_factor=0.5"),
        ({"first_k_dense_replace": 1, "intermediate_size": None}, "intermediate_size must be > 0"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be > 0"),
    ],
)
def test_unsupported_configs_are_refused_by_name(tmp_path, overrides, message):
    write_checkpoint(tmp_path, tiny_config(**overrides), random_state(tiny_config()))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        dyllm_fx.load(str(tmp_path), dtype="float32")


def test_a_missing_expert_is_named(tmp_path):
    cfg = tiny_config()
    state = random_state(cfg)
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    write_checkpoint(tmp_path, cfg, state)
    with pytest.raises(CheckpointError, match=r"missing keys \[model\.layers\.2\.mlp\.experts\.5\.up_proj"):
        dyllm_fx.load(str(tmp_path), dtype="float32")


def test_a_wrong_expert_count_is_named(tmp_path):
    """Weights of 8 experts under a config.json that says 12: the experts the config adds are
    named missing (and the fix: the config and the weights must belong together)."""
    write_checkpoint(tmp_path, tiny_config(num_experts=12), random_state(tiny_config()))
    with pytest.raises(CheckpointError, match=r"experts\.11\..*config\.json belongs to these weights"):
        dyllm_fx.load(str(tmp_path), dtype="float32")


def test_a_mis_shaped_fused_projection_is_named(tmp_path):
    cfg = tiny_config()
    state = random_state(cfg)
    key = "model.layers.1.attention.query_key_value.weight"
    state[key] = state[key][:-8]
    write_checkpoint(tmp_path, cfg, state)
    with pytest.raises(CheckpointError, match=re.escape(key)):
        dyllm_fx.load(str(tmp_path), dtype="float32")


# --- block diffusion: LLaDA2's own generation loop ------------------------------------------

PROMPTS = ["abc", "hello w"]  # 3 and 7 tokens: the first block decoded holds the prompt's tail
GEN = dict(gen_length=12, block_length=BLOCK)
# Each row policy's parameters that recompute every row of the sequence at every step, and the
# block caches, which are exact for a block-causal model: the untransformed model's tokens.
EXACT = {
    "dense": {},
    "prefix_cache": {},
    "dual_cache": {},
    "dyllm": {"every_row": True, "full_query_interval": 1},
    "es_dllm": {"proportion_steps": ((1.0, 0.0),), "scope": "all", "delay_eos": False},
}


@pytest.fixture(scope="module")
def traced(loaded):
    return dyllm_fx.transform(loaded[0])


def with_policy(traced, name: str, **params) -> TransformedModel:
    module = TransformedModel(
        traced.program, make_policy(name, **params), traced.diffusion, block_length=BLOCK
    )
    module.attention_block_length = BLOCK
    return module


def _published(state, cfg, tokenizer, prompt, steps, threshold, **sampling):
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return llada2_generate(
        lambda x, pos: llada2_logits(state, cfg, x, position_ids=pos),
        ids,
        GEN["gen_length"],
        BLOCK,
        steps,
        threshold,
        cfg["mask_token_id"],
        cfg["eos_token_id"],
        **sampling,
    )[0]


def _ours(out, row: int, prompt_length: int, eos: int) -> torch.Tensor:
    """Row ``row`` of a generation without its left padding, cut after its first EOS."""
    seq = out.sequences[row][out.prompt_length - prompt_length :]
    response = seq[prompt_length:].tolist()
    cut = response.index(eos) + 1 if eos in response else len(response)
    return seq[: prompt_length + cut]


@pytest.mark.parametrize("steps_per_block, threshold", [(4, 0.9), (2, 1.0)])
def test_generation_equals_the_published_loop(checkpoint, loaded, steps_per_block, threshold):
    """``steps`` counts over the response (3 blocks) as everywhere in dyllm-fx; the published
    loop takes the steps of each block."""
    _, cfg, state = checkpoint
    model, tokenizer = loaded
    out = dyllm_fx.generate(model, tokenizer, PROMPTS, steps=3 * steps_per_block, threshold=threshold, **GEN)
    for row, prompt in enumerate(PROMPTS):
        want = _published(state, cfg, tokenizer, prompt, steps_per_block, threshold)
        assert torch.equal(_ours(out, row, len(prompt), cfg["eos_token_id"]), want)


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)],
    ids=["t1", "t0.7-top_k5", "t1.3-top_p0.8"],
)
def test_sampling_equals_the_published_loop_for_a_seed(checkpoint, loaded, sampling):
    """At a temperature above 0 the published loop draws every block position's token with
    torch.multinomial; with the same seed, the same draws and the same tokens here."""
    _, cfg, state = checkpoint
    model, tokenizer = loaded
    out = dyllm_fx.generate(model, tokenizer, PROMPTS, steps=12, threshold=0.9, seed=7, **sampling, **GEN)
    greedy = dyllm_fx.generate(model, tokenizer, PROMPTS, steps=12, threshold=0.9, **GEN)
    torch.manual_seed(7)  # one seed for the prompts in turn, as generate() decodes them
    for row, prompt in enumerate(PROMPTS):
        want = _published(state, cfg, tokenizer, prompt, 4, 0.9, **sampling)
        assert torch.equal(_ours(out, row, len(prompt), cfg["eos_token_id"]), want)
    assert not torch.equal(out.sequences, greedy.sequences)  # the draws changed something


def test_decoding_stops_after_the_block_with_an_eos(tmp_path):
    cfg = tiny_config()
    state = random_state(cfg)
    state["lm_head.weight"][cfg["eos_token_id"]] *= 3.0  # EOS wins somewhere in the second block
    model, tokenizer = dyllm_fx.load(str(write_checkpoint(tmp_path, cfg, state)), dtype="float32")
    out = dyllm_fx.generate(model, tokenizer, PROMPTS, steps=12, threshold=0.9, **GEN)
    for row, prompt in enumerate(PROMPTS):
        want = _published(state, cfg, tokenizer, prompt, 4, 0.9)
        assert want[-1].item() == cfg["eos_token_id"]
        assert torch.equal(_ours(out, row, len(prompt), cfg["eos_token_id"]), want)
    assert out.stats.nfe < 2 * 3 * 4  # not every block of both prompts ran


@pytest.mark.parametrize("name", sorted(EXACT))
def test_policies_recomputing_what_changed_give_the_model_tokens(loaded, traced, name):
    model, tokenizer = loaded
    exact = with_policy(traced, name, **EXACT[name])
    want = dyllm_fx.generate(model, tokenizer, PROMPTS, steps=12, threshold=0.9, **GEN).sequences
    assert torch.equal(
        dyllm_fx.generate(exact, tokenizer, PROMPTS, steps=12, threshold=0.9, **GEN).sequences, want
    )


@pytest.mark.parametrize("name", [n for n in NAMES + COMPOSED if n != "fixed"])
def test_every_policy_runs_inside_the_block(loaded, traced, name):
    out = dyllm_fx.generate(with_policy(traced, name), loaded[1], PROMPTS, threshold=0.9, **GEN)
    assert out.sequences.shape == (2, 7 + GEN["gen_length"])


@pytest.mark.slow  # compiling the pieces with aot_eager: about 30 s on the shared 2-core machine
def test_eager_equals_compiled(loaded, traced):
    model, tokenizer = loaded
    compiled = dyllm_fx.transform(model, policy="prefix_cache", compile="aot_eager")
    eager = with_policy(traced, "prefix_cache")
    settings = dict(steps=12, threshold=0.9, **GEN)
    got = dyllm_fx.generate(compiled, tokenizer, PROMPTS[0], **settings).sequences
    assert torch.equal(got, dyllm_fx.generate(eager, tokenizer, PROMPTS[0], **settings).sequences)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"gen_length": 10, "block_length": BLOCK}, f"block_length={BLOCK} must divide gen_length=10"),
        ({"gen_length": 16, "block_length": 8}, f"this model attends in blocks of {BLOCK} tokens"),
        (
            {"gen_length": 16, "block_length": BLOCK, "steps": 6},
            "steps=6 must be a positive multiple of the number of blocks",
        ),
        ({"gen_length": 16, "block_length": BLOCK, "temperature": -0.5}, "temperature must be"),
        ({"gen_length": 16, "block_length": BLOCK, "temperature": 0.7, "top_p": 0.0}, "top_p must be"),
        ({"gen_length": 16, "block_length": BLOCK, "top_k": -1}, "top_k must be"),
        ({"gen_length": 16, "block_length": BLOCK, "alg": "entropy"}, "drop ['alg']"),
    ],
)
def test_bad_block_settings_are_refused_before_any_work(loaded, monkeypatch, settings, message):
    model, tokenizer = loaded

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran before the settings were checked")

    monkeypatch.setattr(model, "forward", no_forward)
    with pytest.raises(ValueError, match=re.escape(message)):
        dyllm_fx.generate(model, tokenizer, PROMPTS, **settings)


def test_the_block_causal_mask_is_not_refused_as_causal():
    """Inside a block every query sees every key, so the pass that refuses causal attention lets
    the mask through; a block of one token is plain causal attention, and is refused."""
    positions = torch.arange(3 * BLOCK)[None]
    assert not is_causal_mask(block_causal_mask(positions, None, BLOCK))
    assert is_causal_mask(block_causal_mask(positions, None, 1))


def test_the_serving_scheduler_refuses_it_naming_generate(loaded):
    """Serving batches rows on LLaDA's block clock, not LLaDA2's loop: refused, not decoded wrong."""
    with pytest.raises(UsageError, match=re.escape("dyllm_fx.generate(model, tokenizer, prompts)")):
        dyllm_fx.LLM(*loaded)


def test_the_random_model_for_the_bench_row_generates():
    """``llada2:random`` (for a ``dyllm bench --model`` registry): every weight drawn from the
    seed, so two builds agree, and it decodes."""
    tok = tiny_tokenizer()
    ids = dict(vocab_size=len(tok), mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id)
    model, again = random_model(seed=3, **ids), random_model(seed=3, **ids)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    out = dyllm_fx.generate(model, tok, "abc", gen_length=16, block_length=8)
    assert out.sequences.shape == (1, 3 + 16)
