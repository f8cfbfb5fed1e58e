"""dyllm_fx.transform end to end: dense equivalence, generation, the dynamo backend, the fixed
policy against a hand-written reference, the cache, explain() and the error messages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import block_reference
import dyllm_fx
from dyllm_fx import generate, transform
from dyllm_fx.models.hf import bidirectional
from dyllm_fx.models.layers import default_position_ids, key_padding_mask
from dyllm_fx.runtime.policies import DensePolicy, FixedPolicy, HostState, make_policy
from dyllm_fx.transform import TransformedModel
from tiny_checkpoints import tiny_dream, tiny_llada, tiny_tokenizer

PROMPTS_RAGGED = ["rev:abc=", "kv:a1,b2?ab=", "x=1?"]
GEN = dict(gen_length=16, block_length=8, steps=16, stop_at_eos=False, progress=False)


def _sharpen(model, head):
    """Scale the LM head up: larger logit gaps, varied greedy tokens, no near-ties."""
    with torch.no_grad():
        head.weight.mul_(3.0)
    return model


def _llada():
    m = tiny_llada(seed=11)
    return _sharpen(m, m.model.transformer.ff_out)


def _dream():
    m = tiny_dream(seed=12)
    return _sharpen(m, m.lm_head)


def _hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return bidirectional(transformers.LlamaForCausalLM(cfg).eval(), mask_token_id=1)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def models():
    return {"llada": _llada(), "dream": _dream(), "hf-llama": _hf_llama()}


@pytest.fixture(scope="module")
def dense(models):
    return {name: transform(m) for name, m in models.items()}


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batch(vocab, bsz, seq_len, seed=0, pad=(0, 3, 1)):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (bsz, seq_len), generator=gen)
    if bsz == 1:
        return ids, None
    mask = torch.ones_like(ids)
    for b in range(bsz):
        mask[b, : pad[b % len(pad)]] = 0  # left padding
        ids[b, : pad[b % len(pad)]] = 0
    return ids, mask


def _vocab(model):
    cfg = getattr(model, "config", None) or model.model.config
    return min(cfg.vocab_size, 40)


# --------------------------------------------------------------------------- (a) dense equivalence


@pytest.mark.parametrize("name", ["llada", "dream", "hf-llama"])
@pytest.mark.parametrize("bsz", [1, 3])
def test_dense_logits_equal_original(models, dense, name, bsz):
    model, tm = models[name], dense[name]
    ids, mask = _batch(_vocab(model), bsz, 13, seed=bsz)
    with torch.no_grad():
        want = model(ids, attention_mask=mask)
        got = tm(ids, mask)
    assert isinstance(tm, TransformedModel)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- (b) generation


@pytest.mark.parametrize(
    "name, prompts, block_length",
    [
        ("llada", ["rev:abc="], 8),
        ("llada", PROMPTS_RAGGED, 8),
        ("dream", ["kv:a1,b2?ab="], 8),
        ("dream", PROMPTS_RAGGED, None),
        ("hf-llama", ["rev:abc="], 8),
        ("hf-llama", PROMPTS_RAGGED, 8),
    ],
)
def test_generation_token_identical(models, dense, tok, name, prompts, block_length):
    kw = {**GEN, "block_length": block_length}
    want = generate(models[name], tok, prompts, **kw)
    got = generate(dense[name], tok, prompts, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert got.stats.nfe == want.stats.nfe == kw["steps"]
    assert want.responses.unique().numel() > 1
    assert (want.responses != models[name].diffusion.mask_token_id).any()


# --------------------------------------------------------------------------- (c) torch.compile backend


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llada", "dream", "hf-llama"])
def test_backend_eager_pieces_logits_and_generation(models, tok, dynamo, name):
    model = models[name]
    compiled = torch.compile(model, backend="dyllm", options={"compile_pieces": False, "mask_token_id": 1})
    for bsz, seq_len in ((3, 13), (2, 9)):
        ids, mask = _batch(_vocab(model), bsz, seq_len, seed=seq_len)
        pos = default_position_ids(ids, mask)
        with torch.no_grad():
            torch.testing.assert_close(
                compiled(ids, attention_mask=mask, position_ids=pos), model(ids, mask, pos), rtol=0, atol=1e-5
            )
    # through the dense-step path: every denoising step calls the compiled model
    for prompts in (["rev:abc="], PROMPTS_RAGGED):
        want = generate(model, tok, prompts, **GEN).sequences
        assert torch.equal(generate(compiled, tok, prompts, **GEN).sequences, want)


def test_backend_callable_importable():
    from dyllm_fx.backend import dyllm_backend

    assert callable(dyllm_backend)


@pytest.mark.slow
def test_backend_inductor_pieces(models, dynamo):
    """The one inductor test (slow: each piece is compiled)."""
    model = models["llada"]
    compiled = torch.compile(model, backend="dyllm", options={"compile_pieces": True})
    ids, mask = _batch(_vocab(model), 2, 10, seed=5)
    pos = default_position_ids(ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(ids, attention_mask=mask, position_ids=pos), model(ids, mask, pos), rtol=0, atol=1e-4
        )


# --------------------------------------------------------------------------- (d) fixed policy


def _layer_rows(arch, layer, x, rows, pos, key_mask, k_base, v_base):
    """One block for the rows ``rows`` (B, A) whose inputs are ``x`` (B, A, D); every other
    row's K/V come from ``k_base``/``v_base`` (B, KV, L, d). Returns (out, K, V)."""
    q, k, v = block_reference.project(arch, layer, x, rows, pos)
    k_all, v_all = k_base.clone(), v_base.clone()
    for b in range(x.shape[0]):
        k_all[b][:, rows[b]] = k[b]
        v_all[b][:, rows[b]] = v[b]
    ctx = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=key_mask, enable_gqa=True)
    h_mid = block_reference.o_proj(arch, layer, x, ctx)
    return h_mid + block_reference.mlp(arch, layer, h_mid), k_all, v_all


def _take(x, rows):
    return x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


def _put(x, rows, values):
    return x.scatter(1, rows[..., None].expand(-1, -1, x.shape[-1]), values)


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_fixed_policy_matches_frozen_reference(models, name):
    model = models[name]
    arch = block_reference.arch_modules(model)
    mask_id = model.diffusion.mask_token_id
    bsz, seq_len, n_layers = 2, 12, len(arch["layers"])
    fixed = [3, 7, 9, 10]  # 4 rows: padded to a bucket of 8 by the runtime
    tm = transform(model, policy="fixed", rows=fixed)

    gen = torch.Generator().manual_seed(4)
    ids0 = torch.randint(3, 40, (bsz, seq_len), generator=gen)
    ids0[:, 6:] = mask_id  # the response window, all masks
    attn = torch.ones_like(ids0)
    attn[1, :2] = 0  # a left-padded row
    ids0[1, :2] = 0
    pos = default_position_ids(ids0, attn)
    ids1 = ids0.clone()
    ids1[:, [7, 9, 11]] = torch.tensor([[20, 21, 22], [23, 24, 25]])  # masks -> tokens (11 is not in R)
    key_mask = key_padding_mask(attn)
    rows = torch.tensor(fixed).expand(bsz, -1)
    all_rows = torch.arange(seq_len).expand(bsz, -1)

    with torch.no_grad():
        cold = tm(ids0, attn, pos)
        assert tm._continues(ids1)  # only mask positions changed: the same generation
        warm = tm(ids1, attn, pos)

        # reference, cold: every row of ids0, layer by layer; keep each layer's input and K/V
        x = arch["embed"](ids0)
        frozen_x, frozen_k, frozen_v = [], [], []
        shape_kv = (bsz, arch["kv_heads"], seq_len, arch["head_dim"])
        for layer in range(n_layers):
            frozen_x.append(x)
            x, k, v = _layer_rows(
                arch, layer, x, all_rows, pos, key_mask, torch.zeros(shape_kv), torch.zeros(shape_kv)
            )
            frozen_k.append(k)
            frozen_v.append(v)
        frozen_x.append(x)
        cold_ref = arch["head"](arch["norm"](x))
        torch.testing.assert_close(cold, model(ids0, attn, pos), rtol=0, atol=1e-5)
        torch.testing.assert_close(cold, cold_ref, rtol=0, atol=1e-5)

        # reference, warm: rows R recomputed from ids1, every other row frozen at ids0's values
        x_r = _take(arch["embed"](ids1), rows)
        for layer in range(n_layers):
            x_r, _, _ = _layer_rows(arch, layer, x_r, rows, pos, key_mask, frozen_k[layer], frozen_v[layer])
        final = _put(frozen_x[-1], rows, x_r)
        warm_ref = arch["head"](arch["norm"](final))

    torch.testing.assert_close(_take(warm, rows), _take(warm_ref, rows), rtol=0, atol=1e-5)
    others = torch.ones(seq_len, dtype=torch.bool)
    others[fixed] = False
    assert torch.equal(warm[:, others], cold[:, others])  # rows off R: the cold step's logits
    # the test means something: freezing differs from recomputing everything from ids1
    with torch.no_grad():
        dense_rows = _take(model(ids1, attn, pos), rows)
    assert (dense_rows - _take(warm, rows)).abs().max() > 1e-3
    assert [r.active for r in tm.engine.records] == [[seq_len] * n_layers, [len(fixed)] * n_layers]


def test_fixed_policy_restarts_when_a_decoded_token_changes(models):
    model = models["llada"]
    tm = transform(model, policy="fixed", rows=[0, 1])
    ids0, _ = _batch(_vocab(model), 1, 10, seed=9)
    ids1 = ids0.clone()
    ids1[0, 5] = (ids1[0, 5] + 1) % 40 + 3  # a decoded (non-mask) token changed: a new generation
    with torch.no_grad():
        tm(ids0)
        got = tm(ids1)
        torch.testing.assert_close(got, model(ids1), rtol=0, atol=1e-5)  # recomputed cold
    assert [r.active for r in tm.engine.records] == [[10, 10]]  # reset, then one full step


# --------------------------------------------------------------------------- (e) the cache


def test_cache_size_and_allocated_once(models, dense, tok):
    model, tm = models["llada"], dense["llada"]
    cfg = model.config
    ids, mask = _batch(_vocab(model), 2, 11, seed=1)
    with torch.no_grad():
        tm(ids, mask)
    cache = tm.cache
    d = cfg.d_model // cfg.n_heads
    by_hand = 4 * (cfg.n_layers * 2 * 2 * cfg.kv_heads * 11 * d + 2 * 11 * cfg.d_model)  # K/V + final hidden
    assert cache.nbytes == tm.cache_nbytes(2, 11) == by_hand
    tensors = cache.tensors
    with torch.no_grad():
        tm(ids.flip(1), mask)  # same shape, new generation: buffers reused
    assert tm.cache is cache and all(a is b for a, b in zip(tensors, tm.cache.tensors))
    with torch.no_grad():
        tm(ids[:, :7], mask[:, :7])  # another shape: a new cache of the predicted size
    assert tm.cache is not cache and tm.cache.nbytes == tm.cache_nbytes(2, 7)

    # one generation = one cache, across all of its steps (and the next generation of that size)
    out = generate(tm, tok, PROMPTS_RAGGED[:2], **GEN)
    cache = tm.cache
    assert cache.nbytes == tm.cache_nbytes(2, out.sequences.shape[1])
    generate(tm, tok, PROMPTS_RAGGED[:2], **GEN)
    assert tm.cache is cache


# --------------------------------------------------------------------------- (f) explain


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_explain_mentions_every_block(models, dense, name):
    tm = dense[name]
    text = tm.explain()
    assert text == dyllm_fx.explain(tm)
    n_layers = len(models[name].layers)
    assert f"{n_layers} blocks" in text
    for i in range(n_layers):
        assert f"block {i}:" in text
    assert text.count("+ partial_attention") == n_layers
    assert "q_proj" in text and "policy 'dense'" in text


# --------------------------------------------------------------------------- (g) errors


def test_unknown_policy_lists_available():
    with pytest.raises(ValueError, match="unknown policy 'sparsest'") as err:
        make_policy("sparsest")
    assert "dense" in str(err.value) and "fixed" in str(err.value)
    with pytest.raises(ValueError, match="bad parameters"):
        make_policy("fixed")  # rows missing
    with pytest.raises(ValueError):
        make_policy("fixed", rows=[])
    with pytest.raises(ValueError, match="policy object"):
        make_policy(DensePolicy(), rows=[1])
    policy = FixedPolicy([1, 2])
    assert make_policy(policy) is policy


@pytest.mark.parametrize("bad", [[0, 12], [-1, 3]])
def test_fixed_positions_out_of_range(dense, bad):
    ids = torch.full((1, 12), 5)
    host = HostState(ids, torch.ones_like(ids), cold=False, n_layers=2)
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        FixedPolicy(bad).rows(host)
    # through a transformed model: the first (cold) step runs every row; the next one asks the policy
    base = dense["llada"]
    tm = TransformedModel(base.program, make_policy("fixed", rows=bad), base.diffusion)
    with torch.no_grad():
        tm(ids)
        with pytest.raises(ValueError, match="fixed policy positions"):
            tm(ids)


def test_transform_requires_eval_mode():
    model = tiny_llada(seed=0).train()
    with pytest.raises(ValueError, match=r"eval\(\)"):
        transform(model)
