"""The reductions over a vocabulary split across ranks (``dyllm_fx/vocab_parallel.py``): on two
gloo ranks, each holding half of the vocabulary's logits, every value equals the one computed
from the whole vocabulary in one process, and the samplers choose the same tokens, greedily and
at a temperature with the same seed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dyllm_fx.distributed import spawn
from dyllm_fx.runtime.samplers import DreamSampler, LLaDASampler, StepContext
from dyllm_fx.vocab_parallel import (
    VocabShard,
    gather_vocab,
    neg_entropy,
    token_probability,
    top_probability,
    uniform_noise,
    vocab_argmax,
)

SIZE, VOCAB = 2, 10


def _logits() -> torch.Tensor:
    logits = torch.randn(2, 6, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, 0, 2] = logits[0, 0, 7] = 50.0  # a tie across the two halves: the first id wins
    logits[0, 1, 6] = logits[0, 1, 8] = 50.0  # a tie inside one half
    return logits


def _compare_on_rank(rank: int, results) -> None:
    torch.set_num_threads(1)
    rows = VOCAB // SIZE
    shard = VocabShard(rank * rows, rows, VOCAB, dist.group.WORLD.group_name)
    whole = _logits()
    mine = whole[..., shard.start : shard.start + rows]
    tokens = torch.randint(0, VOCAB, whole.shape[:-1], generator=torch.Generator().manual_seed(1))
    close = {
        "argmax": torch.equal(vocab_argmax(mine, shard), whole.argmax(-1)),
        "token probability": torch.allclose(
            token_probability(mine, tokens, shard), token_probability(whole, tokens, None), atol=1e-6
        ),
        "top probability": torch.allclose(top_probability(mine, shard), top_probability(whole, None)),
        "neg entropy": torch.allclose(neg_entropy(mine, shard), neg_entropy(whole, None), atol=1e-5),
        "gather": torch.equal(gather_vocab(mine, shard), whole),
    }
    torch.manual_seed(5)
    noise = uniform_noise(mine, shard)
    torch.manual_seed(5)
    close["noise"] = torch.equal(noise, uniform_noise(whole, None)[..., shard.start : shard.start + rows])

    masked = torch.ones(whole.shape[:-1], dtype=torch.bool)
    masked[:, :2] = False
    samplers = {
        "llada greedy": LLaDASampler(),
        "llada at 0.8": LLaDASampler(temperature=0.8),
        "llada threshold": LLaDASampler(threshold=0.5),
        "dream entropy": DreamSampler(alg="entropy"),
        "dream maskgit_plus": DreamSampler(alg="maskgit_plus"),
        "dream top_p at 0.8 (gathered)": DreamSampler(alg="maskgit_plus", temperature=0.8, top_p=0.9),
        "dream margin (gathered)": DreamSampler(alg="topk_margin"),
    }
    for name, sampler in samplers.items():
        chosen = []
        for logits, vocab in ((mine, shard), (whole, None)):
            ctx = StepContext(0, 4, masked.sum(-1), 3, 12, vocab)
            torch.manual_seed(7)
            picked = sampler.select(logits, masked, ctx)
            chosen.append((picked.transfer, picked.tokens, picked.confidence))
        (t1, k1, c1), (t2, k2, c2) = chosen
        close[name] = (
            torch.equal(t1, t2) and torch.equal(k1[t1], k2[t2]) and torch.allclose(c1, c2, atol=1e-6)
        )
    results.put((rank, close))


@pytest.mark.slow
def test_two_ranks_reduce_to_the_whole_vocabulary():
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    spawn(_compare_on_rank, SIZE, results)
    for _ in range(SIZE):
        rank, close = results.get()
        assert all(close.values()), (rank, [k for k, ok in close.items() if not ok])


def test_a_shard_outside_its_vocabulary_is_refused():
    with pytest.raises(ValueError, match="outside a vocabulary of 10"):
        VocabShard(8, 5, 10, "g")


def test_without_a_shard_the_single_process_code_runs():
    logits = _logits()
    tokens = logits.argmax(-1)
    probs = torch.softmax(logits, -1)
    assert torch.equal(vocab_argmax(logits, None), tokens)
    assert torch.equal(token_probability(logits, tokens, None), probs.gather(-1, tokens[..., None])[..., 0])
    assert torch.equal(top_probability(logits, None), probs.amax(-1))
    assert gather_vocab(logits, None) is logits
