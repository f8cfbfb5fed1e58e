"""transformers' DiffusionGemma (block diffusion: encoder prompt cache + decoder over a canvas)
through dyllm_fx.transform: dense equals the original bit for bit, transformers' generate() and
dyllm_fx.generate give the same tokens, DyLLM with every row salient equals dense, the block
caches apply, ragged batches, torch.compile(backend="dyllm"), and the clear errors.

Tiny random configs built here (sliding and full layers, a mixture of experts,
self-conditioning); no weights. One model is transformed per dtype and its engine's policy
swapped between tests, since tracing is the slow part.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
    pytest.skip("this transformers has no DiffusionGemma", allow_module_level=True)

import dyllm_fx  # noqa: E402
from dyllm_fx.adapters import diffusion_gemma_dynamo  # noqa: E402
from dyllm_fx.adapters import diffusion_gemma_generation as dg  # noqa: E402
from dyllm_fx.errors import UsageError  # noqa: E402
from dyllm_fx.models.diffusion_gemma import random_model  # noqa: E402
from dyllm_fx.runtime.canvas import CanvasSettings, EntropyBoundSampler, temperature  # noqa: E402
from dyllm_fx.runtime.policies import make_policy  # noqa: E402
from tiny_checkpoints import tiny_tokenizer  # noqa: E402

# Slow (`-m "not slow"` leaves it out): builds and runs transformers' DiffusionGemma.
pytestmark = pytest.mark.slow

GEN = dict(max_new_tokens=16, max_denoising_steps=6)  # two canvases of 8


def _model(dtype=torch.float32, seed=0):
    model = random_model(seed=seed, dtype=dtype)
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def fast(model):
    return dyllm_fx.transform(model)


def _use(tm, policy, **config):
    tm.engine.policy = make_policy(policy, family="diffusion_gemma", **config)
    return tm


def _ragged(bsz=3, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (bsz, length), generator=gen)
    mask = torch.ones_like(ids)
    for b, pad in enumerate((0, 3, 5)[:bsz]):
        mask[b, :pad] = 0
        ids[b, :pad] = 0
    return ids, mask


def _hf_generate(model, ids, mask=None, seed=0, **kw):
    torch.manual_seed(seed)
    extra = {} if mask is None else {"attention_mask": mask}
    return model.generate(ids, **{**GEN, **kw}, **extra).sequences


def _one_step(model, ids, mask, sc=None):
    """One decoder call over a fresh encoder cache: (logits, inputs)."""
    calls = dg.DiffusionGemmaCalls(model)
    plen = ids.shape[1]
    cache = calls.encode(
        ids, mask.bool(), torch.arange(plen, dtype=torch.int32)[None], calls.new_cache(ids.shape[0])
    )
    canvas = torch.randint(0, 64, (ids.shape[0], 8), generator=torch.Generator().manual_seed(1))
    masks = calls.decoder_masks(canvas, cache, torch.nn.functional.pad(mask.bool(), (0, 8), value=True))
    pos = torch.arange(plen, plen + 8, dtype=torch.int32)[None]
    return canvas, cache, masks, pos


# --------------------------------------------------------------------------- the compiler's view


def test_program_structure(fast, model):
    program = fast.program
    assert len(program.blocks) == model.config.text_config.num_hidden_layers
    assert program.h0_reads_state  # self-conditioning feeds the first hidden state
    assert all(p.prefix is not None for p in program.attn_parts)  # the encoder cache is a key prefix
    heads = {(k[0], k[1]) for k, _ in program.kv_shapes}
    assert heads == {(2, 8), (1, 16)}  # sliding and full layers keep their own K/V shapes
    text = fast.explain()
    assert "block 2" in text and "cache_write_rows" in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_decoder_call_bit_identical(dtype):
    """One decoder step, first (no self-conditioning) and later, padded and not: the same bits."""
    model = _model(dtype)
    tm = dyllm_fx.transform(
        model
    )  # float32 used to fail on grouped_mm's fake kernel, bfloat16 on the layer scalar
    for padded in (False, True):
        ids, mask = _ragged()
        if not padded:
            mask = torch.ones_like(mask)
        canvas, cache, masks, pos = _one_step(model, ids, mask)
        with torch.no_grad():
            want = model(
                decoder_input_ids=canvas, cache=cache, decoder_attention_mask=masks, decoder_position_ids=pos
            ).logits
            got = tm(
                decoder_input_ids=canvas, cache=cache, decoder_attention_mask=masks, decoder_position_ids=pos
            ).logits
            want2 = model(
                decoder_input_ids=canvas,
                cache=cache,
                self_conditioning_logits=want,
                decoder_attention_mask=masks,
                decoder_position_ids=pos,
            ).logits
            got2 = tm(
                decoder_input_ids=canvas,
                cache=cache,
                self_conditioning_logits=want,
                decoder_attention_mask=masks,
                decoder_position_ids=pos,
            ).logits
        assert torch.equal(got, want) and torch.equal(got2, want2)
    assert [r.kind for r in tm.engine.records] == [
        "full",
        "full",
    ]  # a new canvas key resets; warm steps follow


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("ragged", [False, True])
def test_transformers_generate_same_tokens_under_dense(model, fast, ragged):
    _use(fast, "dense")
    ids, mask = (
        _ragged()
        if ragged
        else (torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(3)), None)
    )
    want = _hf_generate(model, ids, mask)
    got = _hf_generate(fast, ids, mask)
    assert torch.equal(got, want)
    assert want.shape[1] == ids.shape[1] + 16 and want[:, ids.shape[1] :].unique().numel() > 4


def test_dyllm_fx_generate_follows_transformers(model, fast):
    """runtime/canvas.py's sampler draws the same random numbers as transformers' generate()."""
    _use(fast, "dense")
    ids, mask = _ragged()
    want = _hf_generate(model, ids, mask)
    plain = dg.generate_ids(model, ids, mask, max_new_tokens=16, steps=6, seed=0)
    accelerated = dg.generate_ids(fast, ids, mask, max_new_tokens=16, steps=6, seed=0)
    assert torch.equal(plain.sequences, want) and torch.equal(accelerated.sequences, want)
    assert plain.stats.canvases == 2 and plain.stats.nfe == sum(plain.stats.steps_per_canvas)


def test_dyllm_fx_generate_text_api(model, fast):
    tok = tiny_tokenizer()
    _use(fast, "dense")
    prompts = ["rev:abc=", "kv:a1,b2?ab="]
    want = dyllm_fx.generate(model, tok, prompts, max_new_tokens=8, steps=5, seed=0)
    got = dyllm_fx.generate(fast, tok, prompts, max_new_tokens=8, steps=5, seed=0)
    assert torch.equal(got.sequences, want.sequences) and len(got.texts) == 2
    with pytest.raises(UsageError, match="entropy bound"):
        dyllm_fx.generate(model, tok, prompts, threshold=0.9)
    with pytest.raises(UsageError, match="unknown DiffusionGemma sampler option"):
        dyllm_fx.generate(model, tok, prompts, remasking="low_confidence")


def test_eos_stops_and_pads(model, fast):
    """An EOS ends an element: tokens after it become pad, later canvases too (transformers' rule)."""
    _use(fast, "dense")
    ids, mask = _ragged()
    want = _hf_generate(model, ids, mask, eos_token_id=[5, 9], max_new_tokens=24)
    got = dg.generate_ids(fast, ids, mask, max_new_tokens=24, steps=6, seed=0, eos_token_id=[5, 9])
    assert torch.equal(got.sequences, want)
    assert (want[:, ids.shape[1] :] == 0).any()  # something was padded after an EOS


def test_sampler_pieces():
    settings = CanvasSettings.from_generation_config(None, t_min=0.5)
    assert (settings.t_min, settings.t_max, settings.max_denoising_steps, settings.entropy_bound) == (
        0.5,
        0.8,
        48,
        0.1,
    )
    assert (
        temperature(48, 48, 0.4, 0.8).item() == pytest.approx(0.8)
        and temperature(1, 48, 0.4, 0.8).item() < 0.41
    )
    # entropies about 0.011, ln 10 = 2.30, 0.344, 2.30: sorted, the sum of each prefix less its
    # largest entry is 0, 0.011, 0.355, 2.66; a bound of 0.3 keeps the first two
    sampler = EntropyBoundSampler(0.3, vocab_size=10, canvas_length=4)
    logits = torch.tensor([[[9.0] + [0.0] * 9, [0.0] * 10, [5.0] + [0.0] * 9, [0.0] * 10]])
    assert sampler.accepted(logits).tolist() == [[True, False, True, False]]  # the two confident positions
    # a bound of 0.5 also takes one of the uniform positions (0.355 <= 0.5: transformers' rule)
    assert EntropyBoundSampler(0.5, 10, 4).accepted(logits).sum().item() == 3
    with pytest.raises(ValueError, match="t_min"):
        CanvasSettings(t_min=0.9, t_max=0.8).check()


# --------------------------------------------------------------------------- policies


def test_dyllm_every_row_salient_equals_dense(model, fast):
    ids, mask = _ragged()
    want = _hf_generate(model, ids, mask)
    _use(fast, "dyllm", every_row=True, full_query_interval=1)
    got = _hf_generate(fast, ids, mask)
    kinds = [r.kind for r in fast.engine.records]
    assert torch.equal(got, want)
    assert (
        kinds[:2] == ["full", "full"] and "sparse" in kinds
    )  # the official 2 dense steps per canvas, then sparse


def test_dyllm_gates_rows(model, fast):
    """With a low tau the MLP (router + experts) runs on a subset of the canvas rows."""
    _use(fast, "dyllm", tau=0.3)
    out = dg.generate_ids(fast, *_ragged(), max_new_tokens=8, steps=6, seed=0)
    sparse = [r for r in fast.engine.records if r.kind == "sparse"]
    assert out.sequences.shape == (3, 17) and sparse
    assert min(min(r.active[1:]) for r in sparse) < 8  # some layer ran its MLP on fewer rows


@pytest.mark.parametrize("policy", ["prefix_cache", "dual_cache", "dual_cache+dyllm", "dllm_cache"])
def test_block_caches_apply(model, fast, policy):
    """The canvas is the one block (the encoder's cache is the prefix cache): the block caches
    recompute the canvas, so they give dense's tokens (dLLM-Cache at its keep-everything limit)."""
    ids, mask = _ragged()
    want = _hf_generate(model, ids, mask)
    extra = {"every_row": True, "full_query_interval": 1} if "dyllm" in policy else {}
    extra = {"ratio": 1.0, "scope": "all"} if policy == "dllm_cache" else extra
    _use(fast, policy, **extra)
    assert torch.equal(_hf_generate(fast, ids, mask), want)


def test_es_dllm_rejected(model):
    with pytest.raises(UsageError, match="no mask token"):
        dyllm_fx.transform(model, policy="es_dllm")


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_dyllm(model, dtype):
    """Dynamo's decoder-call graphs all run on one transformed model; bfloat16 used to fail with
    a BlockMatchError (the scaled residual stream)."""
    if dtype != torch.float32:
        model = _model(dtype)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(
            model,
            backend="dyllm",
            options={"compile_step": False, "policy": "dyllm", "every_row": True, "full_query_interval": 1},
        )
        ids, mask = _ragged()
        want = dg.generate_ids(model, ids, mask, max_new_tokens=16, steps=5, seed=0).sequences
        got = dg.generate_ids(compiled, ids, mask, max_new_tokens=16, steps=5, seed=0).sequences
        assert torch.equal(got, want)
        shared = list(diffusion_gemma_dynamo._SHARED[model].values())
        assert len(shared) == 1 and "sparse" in [
            r.kind for r in shared[0].engine.records
        ]  # one engine for all graphs
    finally:
        torch._dynamo.reset()


def test_compiled_step(model):
    """The whole step under torch.compile (aot_eager: the same graph capture as inductor, fast);
    the prefix is bucketed so that canvases reuse the compiled step."""
    tm = dyllm_fx.transform(model, compile="aot_eager")
    ids, mask = _ragged()
    want = _hf_generate(model, ids, mask, max_new_tokens=24, max_denoising_steps=3)
    got = _hf_generate(tm, ids, mask, max_new_tokens=24, max_denoising_steps=3)
    assert torch.equal(got, want)
    assert tm.engine.compiler.graphs <= 2  # prefixes 9, 17, 25 -> buckets 16 and 32


# --------------------------------------------------------------------------- loading and errors


def test_from_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "dg")
    loaded = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(
        tmp_path / "dg", attn_implementation="sdpa"
    ).eval()
    tm = dyllm_fx.transform(loaded)
    ids, mask = _ragged()
    assert torch.equal(_hf_generate(tm, ids, mask), _hf_generate(model, ids, mask))


def test_static_cache_rejected(fast):
    ids, _ = _ragged(bsz=1)
    with pytest.raises(UsageError, match="static cache"):
        fast.generate(ids, cache_implementation="static", **GEN)


def test_eager_experts_rejected():
    model = _model()
    model.config.get_text_config()._experts_implementation = "eager"
    with pytest.raises(UsageError, match="experts_implementation"):
        dyllm_fx.transform(model)


def test_decoder_mask_must_be_a_key_mask(model, fast):
    ids, mask = _ragged()
    canvas, cache, masks, pos = _one_step(model, ids, mask)
    odd = {t: m.clone() for t, m in masks.items()}
    odd["full_attention"][:, :, 0, -1] = False  # one canvas row hides a key the others see
    with pytest.raises(UsageError, match="differs between canvas rows"):
        fast(decoder_input_ids=canvas, cache=cache, decoder_attention_mask=odd, decoder_position_ids=pos)


# --------------------------------------------------------------------------- dyllm bench


def test_bench_rows(model):
    """The DiffusionGemma bench: dense agrees with the untransformed model on every token; a low
    tau runs fewer MLP rows (its agreement is whatever it is: measured, not asserted)."""
    from dyllm_fx.eval.diffusion_gemma_bench import default_methods, format_gemma_table, run_gemma_bench

    methods = {m.label: m for m in default_methods(tau=0.3)}
    chosen = [methods["untransformed"], methods["dense"], methods["dyllm"]]
    rows = run_gemma_bench(chosen, n=3, prompt_length=9, max_new_tokens=16, steps=6, model=model)
    base, dense, dy = rows
    assert base.agreement == 1.0 and base.speedup == 1.0 and dense.agreement == 1.0
    assert dense.nfe == base.nfe and dense.active_fraction == 1.0 and dy.active_fraction < 1.0
    assert 0.0 <= dy.agreement <= 1.0 and all(r.tokens_per_s > 0 for r in rows)
    table = format_gemma_table(rows)
    assert "no accuracy" in table and table.count("\n") == len(rows) + 3
    with pytest.raises(ValueError, match="untransformed"):
        run_gemma_bench(chosen[1:], model=model)


def test_bench_cli_rejects_plot(capsys):
    from dyllm_fx.cli.main import main

    assert main(["bench", "--model", "diffusion_gemma:random", "--plot", "x.png"]) == 2
    assert "no accuracy" in capsys.readouterr().err


def test_new_masks_are_not_mistaken_for_memoised_ones(model, fast):
    """The decoder's key masks are memoised per mask object: the same dict given new mask
    tensors (other padding) must not reuse the old key masks."""
    _use(fast, "dense")
    ids, mask = _ragged()
    canvas, cache, masks, pos = _one_step(model, ids, mask)
    _, _, unpadded, _ = _one_step(model, ids, torch.ones_like(mask))
    with torch.no_grad():
        first = fast(
            decoder_input_ids=canvas, cache=cache, decoder_attention_mask=masks, decoder_position_ids=pos
        )
        masks.update(unpadded)  # the same dict object, other tensors in it
        want = model(
            decoder_input_ids=canvas, cache=cache, decoder_attention_mask=masks, decoder_position_ids=pos
        )
        got = fast(
            decoder_input_ids=canvas, cache=cache, decoder_attention_mask=masks, decoder_position_ids=pos
        )
    assert torch.equal(got.logits, want.logits) and not torch.equal(got.logits, first.logits)
