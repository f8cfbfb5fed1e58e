"""Samplers, schedules and the denoising loop against the published reference algorithms.

The references (tests/reference_generate.py) run one full forward over the whole sequence per
step and pick tokens over the whole sequence; ``dyllm_fx.generate`` works on the current
block's logits. At temperature 0 (and with random remasking / Dream "origin" under the same
seed) both must commit exactly the same tokens at exactly the same steps.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dyllm_fx
import reference_generate as ref
import tiny_checkpoints
from dyllm_fx.char_tokenizer import build_char_tokenizer
from dyllm_fx.eval.synthetic_tasks import ALPHABET
from dyllm_fx.models import DreamModel, LLaDAModelLM
from dyllm_fx.runtime.samplers import DreamSampler, LLaDASampler
from dyllm_fx.runtime.sampling_math import add_gumbel_noise, dream_sample_tokens, top_k_filter, top_p_filter
from dyllm_fx.runtime.schedule import (
    BlockSchedule,
    dream_timesteps,
    dream_transfer_count,
    llada_transfer_counts,
)
from dyllm_fx.runtime.step import DenseStep

TOK = build_char_tokenizer(ALPHABET)
V = len(TOK)
MASK = TOK.mask_token_id
EOS = TOK.eos_token_id
PROMPTS = ["12+34=", "abc:x?"]  # same length: no padding, as the references assume


# Tiny models from the one factory (tests/tiny_checkpoints.py), with an LM head scaled up so
# that confidences are peaked and the references' choices are not near-ties. LLaDA's final norm
# is drawn around 0 like a weight (only "norm.weight" names around 1): the draws these tests were
# written against.
SAMPLER_WEIGHTS = dict(norm_std=0.1, norms=("norm.weight",))


def tiny_llada(seed: int = 0, head_scale: float = 2.0, max_len: int = 128) -> LLaDAModelLM:
    return tiny_checkpoints.tiny_llada(
        seed, head_scale=head_scale, max_sequence_length=max_len, **SAMPLER_WEIGHTS
    )


def tiny_dream(seed: int = 0, head_scale: float = 2.0) -> DreamModel:
    return tiny_checkpoints.tiny_dream(seed, head_scale=head_scale, **SAMPLER_WEIGHTS)


class Biased(nn.Module):
    """Adds a constant vector to the logits of ``inner``.

    Used to keep a random model from predicting the mask token (which would leave a position
    masked forever and make the comparisons about nothing), or to make it always say EOS.
    """

    def __init__(self, inner: nn.Module, bias: dict[int, float]):
        super().__init__()
        self.inner = inner
        self.diffusion = inner.diffusion
        vec = torch.zeros(V)
        for tok, val in bias.items():
            vec[tok] = val
        self.register_buffer("bias", vec)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids) + self.bias


class Recording(Biased):
    """Also records the sequence the loop shows the model before every step."""

    def __init__(self, inner: nn.Module, bias: dict[int, float]):
        super().__init__(inner, bias)
        self.log: list[tuple[int, int, int, int, torch.Tensor]] = []

    def make_step_function(self):
        dense = DenseStep(self, self.diffusion)

        def step(request):
            self.log.append(
                (
                    request.block,
                    request.block_start,
                    request.block_end,
                    request.step_in_block,
                    request.input_ids.clone(),
                )
            )
            return dense(request)

        return step


NO_MASK = {MASK: -1e4}


@pytest.fixture(scope="module")
def llada():
    return Biased(tiny_llada(0), NO_MASK)


@pytest.fixture(scope="module")
def dream():
    return Biased(tiny_dream(1), NO_MASK)


def _ids(prompts) -> torch.Tensor:
    return TOK(list(prompts), return_tensors="pt", add_special_tokens=False)["input_ids"]


def _ref_model(model):
    return lambda x, m: model(x, attention_mask=m)


def _assert_not_degenerate(seqs: torch.Tensor, plen: int) -> None:
    resp = seqs[:, plen:]
    assert not (resp == MASK).any()
    assert resp.unique().numel() >= 3, f"response too uniform to compare anything: {resp.tolist()}"


# ------------------------------------------------------------------------------------------
# exact agreement with the references
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gen_length,block_length,steps",
    [(16, 8, 16), (16, 4, 8), (12, 12, 12), (12, 6, 8), (16, 16, 5)],
)
def test_llada_low_confidence_matches_reference(llada, gen_length, block_length, steps):
    out = dyllm_fx.generate(
        llada,
        TOK,
        PROMPTS,
        gen_length=gen_length,
        block_length=block_length,
        steps=steps,
        stop_at_eos=False,
        progress=False,
    )
    expected = ref.llada_generate(
        _ref_model(llada), _ids(PROMPTS), steps, gen_length, block_length, mask_id=MASK
    )
    _assert_not_degenerate(expected, len(PROMPTS[0]))
    assert torch.equal(out.sequences, expected)
    assert out.stats.nfe == steps


@pytest.mark.parametrize("seed", [0, 7])
def test_llada_random_remasking_matches_reference(llada, seed):
    out = dyllm_fx.generate(
        llada,
        TOK,
        PROMPTS,
        gen_length=16,
        block_length=8,
        steps=8,
        remasking="random",
        seed=seed,
        stop_at_eos=False,
        progress=False,
    )
    torch.manual_seed(seed)
    expected = ref.llada_generate(
        _ref_model(llada), _ids(PROMPTS), 8, 16, 8, remasking="random", mask_id=MASK
    )
    _assert_not_degenerate(expected, len(PROMPTS[0]))
    assert torch.equal(out.sequences, expected)


def test_llada_cfg_matches_reference(llada):
    out = dyllm_fx.generate(
        llada,
        TOK,
        PROMPTS,
        gen_length=16,
        block_length=8,
        steps=16,
        cfg_scale=1.0,
        stop_at_eos=False,
        progress=False,
    )
    expected = ref.llada_generate(_ref_model(llada), _ids(PROMPTS), 16, 16, 8, cfg_scale=1.0, mask_id=MASK)
    plain = ref.llada_generate(_ref_model(llada), _ids(PROMPTS), 16, 16, 8, mask_id=MASK)
    _assert_not_degenerate(expected, len(PROMPTS[0]))
    assert not torch.equal(expected, plain), "guidance changed nothing; the comparison would be vacuous"
    assert torch.equal(out.sequences, expected)
    assert out.stats.nfe == 2 * 16  # conditional + unconditional branch per step


@pytest.mark.parametrize(
    "alg,params",
    [
        ("maskgit_plus", {}),
        ("topk_margin", {}),
        ("entropy", {}),
        ("maskgit_plus", {"top_p": 0.9, "top_k": 5}),
    ],
)
@pytest.mark.parametrize("gen_length,steps", [(16, 16), (16, 6)])
def test_dream_confidence_algs_match_reference(dream, alg, params, gen_length, steps):
    out = dyllm_fx.generate(
        dream,
        TOK,
        PROMPTS,
        gen_length=gen_length,
        block_length=None,
        steps=steps,
        alg=alg,
        stop_at_eos=False,
        progress=False,
        **params,
    )
    expected = ref.dream_generate(
        _ref_model(dream), _ids(PROMPTS), steps, gen_length, alg=alg, mask_id=MASK, **params
    )
    _assert_not_degenerate(expected, len(PROMPTS[0]))
    assert torch.equal(out.sequences, expected)
    assert out.stats.nfe == steps


@pytest.mark.parametrize("seed", [0, 3])
def test_dream_origin_matches_reference(dream, seed):
    out = dyllm_fx.generate(
        dream,
        TOK,
        PROMPTS,
        gen_length=16,
        block_length=None,
        steps=8,
        alg="origin",
        seed=seed,
        stop_at_eos=False,
        progress=False,
    )
    torch.manual_seed(seed)
    expected = ref.dream_generate(_ref_model(dream), _ids(PROMPTS), 8, 16, alg="origin", mask_id=MASK)
    _assert_not_degenerate(expected, len(PROMPTS[0]))
    assert torch.equal(out.sequences, expected)


# Random tiny models are unsure of everything; a larger head scale gives confidences above the
# thresholds, so that several tokens are committed in one step.
CONFIDENT = 6.0


@pytest.fixture(scope="module")
def confident_llada():
    return Biased(tiny_llada(0, head_scale=CONFIDENT), NO_MASK)


@pytest.mark.parametrize("threshold", [0.3, 0.5])
@pytest.mark.parametrize("gen_length,block_length", [(16, 8), (12, 12), (16, 4)])
def test_llada_threshold_matches_reference(confident_llada, threshold, gen_length, block_length):
    model = confident_llada
    out = dyllm_fx.generate(
        model,
        TOK,
        PROMPTS,
        gen_length=gen_length,
        block_length=block_length,
        threshold=threshold,
        stop_at_eos=False,
        progress=False,
    )
    expected = ref.llada_generate(
        _ref_model(model), _ids(PROMPTS), None, gen_length, block_length, mask_id=MASK, threshold=threshold
    )
    _assert_not_degenerate(expected, len(PROMPTS[0]))
    assert max(out.stats.tokens_committed) > len(PROMPTS), "no parallel commit: the comparison is vacuous"
    assert torch.equal(out.sequences, expected)


def test_llada_threshold_invariants():
    model = Recording(tiny_llada(0, head_scale=CONFIDENT), NO_MASK)
    gen_length, block_length = 16, 8
    out = dyllm_fx.generate(
        model,
        TOK,
        PROMPTS,
        gen_length=gen_length,
        block_length=block_length,
        threshold=0.5,
        stop_at_eos=False,
        progress=False,
    )
    plen = out.prompt_length
    assert not (out.responses == MASK).any()
    committed = out.stats.tokens_committed
    assert sum(committed) == len(PROMPTS) * gen_length
    assert out.stats.nfe == len(committed)
    # Per row, every step commits at least one token of its block while the block has masks ...
    snapshots = [entry[4] for entry in model.log] + [out.sequences]
    steps_per_block = {b: 0 for b in range(gen_length // block_length)}
    for (block, start, end, _, before), after in zip(model.log, snapshots[1:]):
        steps_per_block[block] += 1
        still_masked = (before[:, start:end] == MASK).sum(-1)
        newly = still_masked - (after[:, start:end] == MASK).sum(-1)
        assert bool(((newly >= 1) | (still_masked == 0)).all())
    # ... so a block never takes more steps than it has tokens, and parallel decoding happened.
    assert all(1 <= n <= block_length for n in steps_per_block.values())
    assert out.stats.nfe < gen_length, "threshold never committed two tokens at once; raise the head scale"
    assert plen == len(PROMPTS[0])


# ------------------------------------------------------------------------------------------
# loop invariants
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gen_length,block_length,steps,per_block",
    [(16, 8, 8, [2, 2, 2, 2]), (12, 6, 8, [2, 2, 1, 1]), (12, 12, 5, [3, 3, 2, 2, 2])],
)
def test_llada_commits_schedule_counts(llada, gen_length, block_length, steps, per_block):
    out = dyllm_fx.generate(
        llada,
        TOK,
        PROMPTS,
        gen_length=gen_length,
        block_length=block_length,
        steps=steps,
        stop_at_eos=False,
        progress=False,
    )
    blocks = gen_length // block_length
    assert out.stats.tokens_committed == [len(PROMPTS) * n for n in per_block] * blocks
    assert out.stats.nfe == steps == len(out.stats.step_seconds)
    assert not (out.responses == MASK).any()


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_blocks_decode_left_to_right(kind):
    inner = tiny_llada(0) if kind == "llada" else tiny_dream(1)
    model = Recording(inner, NO_MASK)
    gen_length, block_length, steps = 16, 4, 8
    out = dyllm_fx.generate(
        model,
        TOK,
        PROMPTS,
        gen_length=gen_length,
        block_length=block_length,
        steps=steps,
        stop_at_eos=False,
        progress=False,
    )
    plen = out.prompt_length
    assert [entry[0] for entry in model.log] == [b for b in range(4) for _ in range(2)]
    snapshots = [entry[4] for entry in model.log] + [out.sequences]
    for (block, start, end, step, before), after in zip(model.log, snapshots[1:]):
        assert (start, end) == (plen + block * block_length, plen + (block + 1) * block_length)
        assert torch.equal(before[:, :plen], _ids(PROMPTS)), "the prompt changed"
        assert not (before[:, plen:start] == MASK).any(), "an earlier block is not complete"
        assert (before[:, end:] == MASK).all(), "a later block was touched"
        # Outside the current block nothing changes during its step.
        assert torch.equal(before[:, :start], after[:, :start])
        assert torch.equal(before[:, end:], after[:, end:])
        # Committed tokens stay committed.
        kept = before[:, start:end] != MASK
        assert torch.equal(before[:, start:end][kept], after[:, start:end][kept])
    assert not (out.responses == MASK).any()


def test_seeded_sampling_is_deterministic():
    model = Biased(tiny_llada(2, head_scale=0.1), NO_MASK)  # flat logits: sampling has room to differ
    kw = dict(gen_length=16, block_length=8, steps=8, temperature=1.0, stop_at_eos=False, progress=False)
    a = dyllm_fx.generate(model, TOK, PROMPTS, seed=123, **kw).sequences
    b = dyllm_fx.generate(model, TOK, PROMPTS, seed=123, **kw).sequences
    c = dyllm_fx.generate(model, TOK, PROMPTS, seed=124, **kw).sequences
    greedy = dyllm_fx.generate(model, TOK, PROMPTS, **{**kw, "temperature": 0.0}).sequences
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, greedy)


def test_dream_seeded_sampling_is_deterministic():
    model = Biased(tiny_dream(2, head_scale=0.1), NO_MASK)
    kw = dict(
        gen_length=12,
        block_length=None,
        steps=6,
        temperature=1.0,
        alg="maskgit_plus",
        alg_temp=0.5,
        stop_at_eos=False,
        progress=False,
    )
    a = dyllm_fx.generate(model, TOK, PROMPTS, seed=5, **kw).sequences
    b = dyllm_fx.generate(model, TOK, PROMPTS, seed=5, **kw).sequences
    c = dyllm_fx.generate(model, TOK, PROMPTS, seed=6, **kw).sequences
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not (a == MASK).any()


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_ragged_batch_matches_single_prompts(llada, dream, kind):
    model = llada if kind == "llada" else dream
    prompts = ["12+34=56,", "ab?", "x:y"]
    kw = dict(
        gen_length=8, block_length=4 if kind == "llada" else None, steps=8, stop_at_eos=False, progress=False
    )
    batch = dyllm_fx.generate(model, TOK, prompts, **kw)
    assert batch.prompt_length == len(prompts[0])
    for row, prompt in enumerate(prompts):
        alone = dyllm_fx.generate(model, TOK, prompt, **kw)
        assert torch.equal(batch.responses[row], alone.responses[0]), prompt
        assert batch.texts[row] == alone.texts[0]
    assert batch.responses.unique().numel() >= 3


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_stop_at_eos_skips_remaining_blocks(kind):
    inner = tiny_llada(0) if kind == "llada" else tiny_dream(1)
    model = Biased(inner, {MASK: -1e4, EOS: 100.0})
    out = dyllm_fx.generate(model, TOK, PROMPTS, gen_length=16, block_length=8, steps=8, progress=False)
    assert out.stats.stopped_early_at_block == 0
    assert (out.responses == EOS).all()
    assert out.texts == ["", ""]
    assert out.stats.nfe == 4  # the steps of the first block only
    assert len(out.stats.tokens_committed) == 4


def test_no_early_stop_without_eos(llada):
    model = Biased(llada.inner, {MASK: -1e4, EOS: -1e4})
    out = dyllm_fx.generate(model, TOK, PROMPTS, gen_length=16, block_length=8, steps=8, progress=False)
    assert out.stats.stopped_early_at_block is None
    assert out.stats.nfe == 8
    assert all(len(t) == 16 for t in out.texts)


# ------------------------------------------------------------------------------------------
# schedule
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3, 4, 7, 16])
def test_llada_transfer_counts(steps):
    masked = torch.tensor([0, 1, 7, 8, 16, 29])
    counts = llada_transfer_counts(masked, steps)
    assert counts.shape == (len(masked), steps)
    assert torch.equal(counts.sum(-1), masked)
    assert bool(((counts.max(-1).values - counts.min(-1).values) <= 1).all())
    assert bool((counts[:, 1:] <= counts[:, :-1]).all()), "the extra tokens go to the first steps"
    block_mask = torch.arange(32)[None, :] < masked[:, None]
    assert torch.equal(counts, ref.llada_num_transfer_tokens(block_mask, steps))


@pytest.mark.parametrize("steps,eps", [(1, 1e-3), (5, 1e-3), (16, 1e-3), (8, 0.1)])
def test_dream_transfer_count(steps, eps):
    grid = dream_timesteps(steps, eps)
    assert torch.equal(grid, torch.linspace(1, eps, steps + 1))
    for masked in (0, 1, 5, 13, 64):
        assert dream_transfer_count(masked, steps - 1, steps, grid) == masked
        for step in range(steps - 1):
            t, s = grid[step], grid[step + 1]
            expected = int(
                (torch.tensor([masked, masked]).sum() / 2) * (1 - s / t)
            )  # the reference's arithmetic
            got = dream_transfer_count(masked, step, steps, grid)
            assert got == expected
            assert 0 <= got <= masked


def test_block_schedule_build():
    sched = BlockSchedule.build(5, 16, 4, 8)
    assert (sched.num_blocks, sched.steps_per_block) == (4, 2)
    assert sched.block_bounds(0) == (5, 9) and sched.block_bounds(3) == (17, 21)
    whole = BlockSchedule.build(5, 16, None, 16)
    assert (whole.block_length, whole.num_blocks, whole.steps_per_block) == (16, 1, 16)
    assert BlockSchedule.build(5, 16, 8, None).steps_per_block is None


def test_block_schedule_errors():
    with pytest.raises(
        ValueError, match=r"block_length=6 must divide gen_length=16; e\.g\. use block_length=4"
    ):
        BlockSchedule.build(3, 16, 6, 16)
    with pytest.raises(
        ValueError, match=r"steps=6 must be a positive multiple of the number of blocks.*e\.g\. steps=8"
    ):
        BlockSchedule.build(3, 16, 4, 6)
    with pytest.raises(ValueError, match="steps=0"):
        BlockSchedule.build(3, 16, 4, 0)
    with pytest.raises(ValueError, match="gen_length must be positive"):
        BlockSchedule.build(3, 0, None, 4)


# ------------------------------------------------------------------------------------------
# token-level sampling math
# ------------------------------------------------------------------------------------------


def test_top_k_filter_keeps_exactly_k():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for k in (1, 5, 50, 80):
        out = top_k_filter(logits, k)
        kept = out > torch.finfo(out.dtype).min
        assert bool((kept.sum(-1) == min(k, 50)).all())
        assert torch.equal(out[kept], logits[kept])
        top = torch.topk(logits, min(k, 50)).indices
        assert bool(kept.gather(-1, top).all())
        assert torch.equal(out, ref.dream_top_k_logits(logits, k))


@pytest.mark.parametrize(
    "top_p,kept", [(0.3, 1), (0.45, 1), (0.6, 2), (0.7, 2), (0.85, 3), (0.9, 3), (0.99, 4)]
)
def test_top_p_filter_keeps_minimal_nucleus(top_p, kept):
    # Sorted probabilities 0.5, 0.3, 0.15, 0.05, shuffled; token i is dropped when the mass of
    # the tokens before it exceeds top_p (before: 0, 0.5, 0.8, 0.95).
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    out = top_p_filter(probs.log(), top_p)
    keep = out > torch.finfo(out.dtype).min
    assert int(keep.sum()) == kept
    order = [1, 3, 0, 2]  # descending probability
    assert keep[0, order[:kept]].all() and not keep[0, order[kept:]].any()
    assert torch.equal(out, ref.dream_top_p_logits(probs.log(), top_p))


def test_top_p_filter_matches_reference_on_random_logits():
    logits = 2 * torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    for top_p in (0.1, 0.5, 0.9, 0.95):
        assert torch.equal(top_p_filter(logits, top_p), ref.dream_top_p_logits(logits, top_p))


def test_add_gumbel_noise():
    logits = torch.randn(2, 3, 7)
    assert add_gumbel_noise(logits, 0) is logits
    torch.manual_seed(0)
    noisy = add_gumbel_noise(logits, 1.0)
    assert noisy.dtype == torch.float64 and noisy.shape == logits.shape
    torch.manual_seed(0)
    assert torch.equal(noisy, ref.llada_gumbel(logits, 1.0))


@pytest.mark.parametrize(
    "confidence,flags",
    [("prob", {}), ("margin", {"margin_confidence": True}), ("neg_entropy", {"neg_entropy": True})],
)
def test_dream_sample_tokens_matches_reference(confidence, flags):
    logits = 3 * torch.randn(10, 44, generator=torch.Generator().manual_seed(2))
    conf, tok = dream_sample_tokens(logits, 0.0, 0.9, 8, confidence)
    ref_conf, ref_tok = ref.dream_sample_tokens(logits, 0.0, 0.9, 8, **flags)
    assert torch.equal(tok, ref_tok)
    assert torch.allclose(conf, ref_conf)
    with pytest.raises(ValueError, match="unknown confidence"):
        dream_sample_tokens(logits, 0.0, None, None, "bogus")


# ------------------------------------------------------------------------------------------
# argument errors
# ------------------------------------------------------------------------------------------


def test_generate_rejects_bad_prompts(llada):
    with pytest.raises(ValueError, match="prompts is empty"):
        dyllm_fx.generate(llada, TOK, [], gen_length=8, block_length=8)
    with pytest.raises(ValueError, match="non-empty string"):
        dyllm_fx.generate(llada, TOK, ["12", ""], gen_length=8, block_length=8)


def test_generate_rejects_window_overflow():
    model = tiny_llada(0, max_len=16)
    with pytest.raises(
        ValueError, match=r"prompt \(6 tokens\) \+ gen_length \(16\) = 22 exceeds the model's window of 16"
    ):
        dyllm_fx.generate(model, TOK, "12+34=", gen_length=16, block_length=8)
    out = dyllm_fx.generate(model, TOK, "12+34=", gen_length=8, block_length=8, progress=False)  # 14 fits
    assert out.sequences.shape == (1, 14)


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5])
def test_generate_rejects_bad_threshold(llada, dream, threshold):
    for model in (llada, dream):
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
            dyllm_fx.generate(model, TOK, "12", gen_length=8, block_length=8, threshold=threshold)


def test_generate_rejects_bad_sampler_params(llada, dream):
    with pytest.raises(ValueError, match="remasking must be 'low_confidence' or 'random'"):
        dyllm_fx.generate(llada, TOK, "12", gen_length=8, block_length=8, remasking="high_confidence")
    with pytest.raises(ValueError, match="alg must be one of origin, maskgit_plus, topk_margin, entropy"):
        dyllm_fx.generate(dream, TOK, "12", gen_length=8, block_length=8, alg="greedy")
    with pytest.raises(ValueError, match="threshold decoding needs a confidence"):
        dyllm_fx.generate(llada, TOK, "12", gen_length=8, block_length=8, threshold=0.9, remasking="random")
    with pytest.raises(ValueError, match="alg='entropy' has none"):
        dyllm_fx.generate(dream, TOK, "12", gen_length=8, block_length=8, threshold=0.9, alg="entropy")
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        dyllm_fx.generate(llada, TOK, "12", gen_length=8, block_length=8, temperature=-1.0)
    with pytest.raises(ValueError, match="pass either a sampler object or sampler parameters"):
        dyllm_fx.generate(
            llada, TOK, "12", gen_length=8, block_length=8, sampler=LLaDASampler(), temperature=1.0
        )
    with pytest.raises(ValueError, match="block_length=3 must divide gen_length=8"):
        dyllm_fx.generate(llada, TOK, "12", gen_length=8, block_length=3)
    with pytest.raises(TypeError, match="no `diffusion` spec"):
        dyllm_fx.generate(nn.Linear(2, 2), TOK, "12", gen_length=8, block_length=8)


def test_explicit_sampler_object(dream):
    kw = dict(gen_length=12, block_length=None, steps=6, stop_at_eos=False, progress=False)
    a = dyllm_fx.generate(dream, TOK, PROMPTS, sampler=DreamSampler(alg="topk_margin"), **kw)
    b = dyllm_fx.generate(dream, TOK, PROMPTS, alg="topk_margin", **kw)
    assert torch.equal(a.sequences, b.sequences)
