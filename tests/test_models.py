"""The LLaDA and Dream modules: key names, shapes, attention semantics, config checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dyllm_fx.models import (
    DreamConfig,
    DreamModel,
    LLaDAConfig,
    LLaDAModelLM,
    build_model,
    model_config_dict,
)
from dyllm_fx.models.layers import RMSNorm, bidirectional_attention, default_position_ids
from tiny_checkpoints import tiny_dream, tiny_llada, tiny_tokenizer

VOCAB = len(tiny_tokenizer())
N_LAYERS = 2

LLADA_BLOCK_PARAMS = (
    "attn_norm",
    "ff_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "attn_out",
    "ff_proj",
    "up_proj",
    "ff_out",
)


def llada_keys(n_layers: int, tied: bool = False) -> set[str]:
    keys = {"model.transformer.wte.weight", "model.transformer.ln_f.weight"}
    if not tied:
        keys.add("model.transformer.ff_out.weight")
    for i in range(n_layers):
        keys |= {f"model.transformer.blocks.{i}.{name}.weight" for name in LLADA_BLOCK_PARAMS}
    return keys


def dream_keys(n_layers: int, tied: bool = False) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    if not tied:
        keys.add("lm_head.weight")
    for i in range(n_layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            keys |= {f"{p}.self_attn.{proj}.weight", f"{p}.self_attn.{proj}.bias"}
        keys.add(f"{p}.self_attn.o_proj.weight")
        keys |= {f"{p}.mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")}
        keys |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
    return keys


def random_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)  # ids 0-2 are special tokens


# ----------------------------------------------------------------------------------------------
# An independent reference forward pass, written from the published math (not from layers.py).


def ref_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def ref_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Half-split RoPE: dims j and j + hd/2 form the pair rotated by pos * theta^(-2j/hd)."""
    hd = x.shape[-1]
    half = hd // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
    ang = (pos.double()[:, None, :, None] * freq).float()  # (B, 1, T, hd/2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)


def ref_attention(q, k, v, key_mask):
    """q (B, H, T, d); k, v (B, KV, T, d). Query head h reads KV head h // (H // KV)."""
    n_heads, n_kv = q.shape[1], k.shape[1]
    group = n_heads // n_kv
    outs = []
    for h in range(n_heads):
        kh, vh = k[:, h // group], v[:, h // group]
        scores = q[:, h] @ kh.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, T, T), no causal mask
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask.bool()[:, None, :], float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ vh)
    return torch.stack(outs, dim=1)


def ref_forward(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    if isinstance(model, LLaDAModelLM):
        c = model.config
        n_heads, n_kv, eps, theta, n_layers = c.n_heads, c.kv_heads, c.rms_norm_eps, c.rope_theta, c.n_layers
        emb = sd["model.transformer.wte.weight"]
        head = emb if c.weight_tying else sd["model.transformer.ff_out.weight"]
        final_norm = sd["model.transformer.ln_f.weight"]

        def layer(i):
            p = f"model.transformer.blocks.{i}."
            g = lambda n: sd[p + n + ".weight"]  # noqa: E731
            return dict(
                ln1=g("attn_norm"),
                ln2=g("ff_norm"),
                q=g("q_proj"),
                k=g("k_proj"),
                v=g("v_proj"),
                qb=None,
                kb=None,
                vb=None,
                o=g("attn_out"),
                gate=g("ff_proj"),
                up=g("up_proj"),
                down=g("ff_out"),
            )
    else:
        c = model.config
        n_heads, n_kv, eps, theta = c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps, c.rope_theta
        n_layers = c.num_hidden_layers
        emb = sd["model.embed_tokens.weight"]
        head = emb if c.tie_word_embeddings else sd["lm_head.weight"]
        final_norm = sd["model.norm.weight"]

        def layer(i):
            p = f"model.layers.{i}."
            return dict(
                ln1=sd[p + "input_layernorm.weight"],
                ln2=sd[p + "post_attention_layernorm.weight"],
                q=sd[p + "self_attn.q_proj.weight"],
                k=sd[p + "self_attn.k_proj.weight"],
                v=sd[p + "self_attn.v_proj.weight"],
                qb=sd[p + "self_attn.q_proj.bias"],
                kb=sd[p + "self_attn.k_proj.bias"],
                vb=sd[p + "self_attn.v_proj.bias"],
                o=sd[p + "self_attn.o_proj.weight"],
                gate=sd[p + "mlp.gate_proj.weight"],
                up=sd[p + "mlp.up_proj.weight"],
                down=sd[p + "mlp.down_proj.weight"],
            )

    bsz, seq = ids.shape
    if attention_mask is None:
        pos = torch.arange(seq).expand(bsz, seq)
    else:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    x = emb[ids]
    for i in range(n_layers):
        w = layer(i)
        h = ref_rms(x, w["ln1"], eps)

        def proj(weight, bias, heads):
            y = F.linear(h, weight, bias)
            return y.view(bsz, seq, heads, -1).transpose(1, 2)

        q = ref_rope(proj(w["q"], w["qb"], n_heads), pos, theta)
        k = ref_rope(proj(w["k"], w["kb"], n_kv), pos, theta)
        v = proj(w["v"], w["vb"], n_kv)
        ctx = ref_attention(q, k, v, attention_mask).transpose(1, 2).reshape(bsz, seq, -1)
        x = x + ctx @ w["o"].t()
        h2 = ref_rms(x, w["ln2"], eps)
        x = x + (F.silu(h2 @ w["gate"].t()) * (h2 @ w["up"].t())) @ w["down"].t()
    return ref_rms(x, final_norm, eps) @ head.t()


# ----------------------------------------------------------------------------------------------


def test_forward_shapes():
    ids = random_ids(2, 7)
    with torch.no_grad():
        assert tiny_llada()(ids).shape == (2, 7, VOCAB)
        assert tiny_dream()(ids).shape == (2, 7, VOCAB)
        # LLaDA's output width is the padded embedding size, as in the published checkpoint.
        assert tiny_llada(embedding_size=VOCAB + 4)(ids).shape == (2, 7, VOCAB + 4)


def test_llada_state_dict_keys_match_published_layout():
    model = tiny_llada()
    assert set(model.state_dict()) == llada_keys(N_LAYERS)
    cfg = model.config
    sd = model.state_dict()
    assert sd["model.transformer.wte.weight"].shape == (VOCAB, cfg.d_model)
    assert sd["model.transformer.ff_out.weight"].shape == (VOCAB, cfg.d_model)
    assert sd["model.transformer.blocks.0.ff_proj.weight"].shape == (cfg.mlp_hidden_size, cfg.d_model)
    assert sd["model.transformer.blocks.0.ff_out.weight"].shape == (cfg.d_model, cfg.mlp_hidden_size)


def test_dream_state_dict_keys_match_qwen2_layout():
    model = tiny_dream()
    assert set(model.state_dict()) == dream_keys(N_LAYERS)
    cfg = model.config
    sd = model.state_dict()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (cfg.hidden_size, cfg.hidden_size)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (
        cfg.num_key_value_heads * head_dim,
        cfg.hidden_size,
    )
    assert sd["model.layers.0.self_attn.v_proj.bias"].shape == (cfg.num_key_value_heads * head_dim,)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (cfg.hidden_size, cfg.intermediate_size)


@pytest.mark.parametrize("make", [tiny_llada, tiny_dream], ids=["llada", "dream"])
def test_matches_reference_forward(make):
    model = make()
    ids = random_ids(2, 9, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref_forward(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_llada, tiny_dream], ids=["llada", "dream"])
def test_attention_is_bidirectional(make):
    model = make()
    ids = random_ids(1, 8, seed=2)
    changed = ids.clone()
    changed[0, -1] = 3 if ids[0, -1] != 3 else 4
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # A causal model would leave position 0 untouched by the last token.
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("make", [tiny_llada, tiny_dream], ids=["llada", "dream"])
@pytest.mark.parametrize("explicit_positions", [False, True], ids=["default-pos", "explicit-pos"])
def test_left_padding_invariance(make, explicit_positions):
    model = make()
    real = random_ids(1, 5, seed=3)
    other = random_ids(1, 8, seed=4)
    n_pad = other.shape[1] - real.shape[1]
    pad_id = tiny_tokenizer().pad_token_id
    padded = torch.cat([torch.full((1, n_pad), pad_id), real], dim=1)
    ids = torch.cat([padded, other])
    mask = torch.ones_like(ids)
    mask[0, :n_pad] = 0
    kwargs = {"attention_mask": mask}
    if explicit_positions:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(real)
        batched = model(ids, **kwargs)
        alone_other = model(other)
        unmasked = model(ids)
    torch.testing.assert_close(batched[0, n_pad:], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1], alone_other[0], atol=1e-5, rtol=0)
    # The padding does matter when it is not masked, so the check above is not vacuous.
    assert (unmasked[0, n_pad:] - alone[0]).abs().max() > 1e-3


def test_default_position_ids_skip_left_padding():
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert default_position_ids(ids, mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert default_position_ids(ids, None).tolist() == [[0, 1, 2, 3, 4]] * 2


def test_dream_gqa_attention_matches_repeated_kv():
    model = tiny_dream()
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    ids = random_ids(2, 6, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, attention_mask=mask)[1, 2:], ref_forward(model, ids, mask)[1, 2:], atol=1e-4, rtol=1e-4
        )


def test_bidirectional_attention_gqa_against_explicit_softmax():
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k = torch.randn(2, 2, 5, 8, generator=gen)
    v = torch.randn(2, 2, 5, 8, generator=gen)
    key_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    out = bidirectional_attention(q, k, v, key_mask.bool()[:, None, None, :])
    torch.testing.assert_close(out, ref_attention(q, k, v, key_mask), atol=1e-5, rtol=1e-5)
    # The head grouping matters: pairing query head h with KV head h % KV (repeat, not
    # repeat_interleave) gives another answer.
    wrong = ref_attention(q, k[:, [0, 1, 0, 1]], v[:, [0, 1, 0, 1]], key_mask)
    assert (out - wrong).abs().max() > 1e-3


def test_rmsnorm_matches_formula():
    gen = torch.Generator().manual_seed(7)
    norm = RMSNorm(16, eps=0.05)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=gen))
    x = 0.3 * torch.randn(3, 4, 16, generator=gen)  # small, so eps visibly matters
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.05)
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-5)
    # bfloat16 input is normalised in float32 and cast back before the weight multiply.
    xb = x.bfloat16()
    expected_b = (
        norm.weight * (xb.float() / torch.sqrt(xb.float().pow(2).mean(-1, keepdim=True) + 0.05)).bfloat16()
    )
    torch.testing.assert_close(norm(xb).float(), expected_b.float(), atol=1e-2, rtol=1e-2)


def test_llada_weight_tying():
    model = tiny_llada(weight_tying=True)
    assert set(model.state_dict()) == llada_keys(N_LAYERS, tied=True)
    assert "model.transformer.ff_out.weight" not in model.state_dict()
    ids = random_ids(1, 6)
    with torch.no_grad():
        out = model(ids)
        assert out.shape == (1, 6, VOCAB)
        torch.testing.assert_close(out, ref_forward(model, ids), atol=1e-4, rtol=1e-4)


def test_dream_tied_word_embeddings():
    model = tiny_dream(tie_word_embeddings=True)
    assert set(model.state_dict()) == dream_keys(N_LAYERS, tied=True)
    assert "lm_head.weight" not in model.state_dict()
    ids = random_ids(1, 6)
    with torch.no_grad():
        out = model(ids)
        assert out.shape == (1, 6, VOCAB)
        torch.testing.assert_close(out, ref_forward(model, ids), atol=1e-4, rtol=1e-4)


def test_llada_gqa_config_supported():
    model = tiny_llada(n_kv_heads=2)
    assert model.state_dict()["model.transformer.blocks.0.k_proj.weight"].shape == (16, 32)
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref_forward(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_llada, tiny_dream], ids=["llada", "dream"])
def test_config_dict_round_trip(make):
    model = make()
    raw = model_config_dict(model)
    rebuilt = build_model(raw)
    assert type(rebuilt) is type(model)
    assert rebuilt.config == model.config
    assert rebuilt.diffusion == model.diffusion


def test_diffusion_spec_conventions():
    tok = tiny_tokenizer()
    llada, dream = tiny_llada(), tiny_dream()
    assert llada.diffusion.logits_shift == 0
    assert dream.diffusion.logits_shift == 1
    for m in (llada, dream):
        assert m.diffusion.mask_token_id == tok.mask_token_id
        assert m.diffusion.eos_token_ids == (tok.eos_token_id,)


def test_llada_unsupported_activation_raises():
    raw = model_config_dict(tiny_llada())
    raw["activation_type"] = "gelu"
    with pytest.raises(ValueError, match="activation_type"):
        LLaDAConfig.from_dict(raw)
    with pytest.raises(ValueError, match="activation_type"):
        build_model(raw)
    raw["activation_type"] = "swiglu"  # the published value is accepted
    assert isinstance(build_model(raw), LLaDAModelLM)


def test_dream_rope_scaling_raises():
    raw = model_config_dict(tiny_dream())
    raw["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="rope_scaling"):
        DreamConfig.from_dict(raw)
    with pytest.raises(ValueError, match="rope_scaling"):
        build_model(raw)
    raw["rope_scaling"] = None  # Qwen2 configs write null when unused
    assert isinstance(build_model(raw), DreamModel)


def test_dream_config_without_mask_token_raises():
    raw = model_config_dict(tiny_dream())
    del raw["mask_token_id"]
    with pytest.raises(ValueError, match="mask_token_id"):
        DreamConfig.from_dict(raw)
