"""Memory: the step cache and the resident set.

* The step cache is allocated once per generation (and reused by the next one of the same
  shape), for every policy.
* Its size is predictable: ``TransformedModel.cache_nbytes(batch, seq)`` before the run equals
  what the run allocates, and ``GenerationOutput.stats.cache_bytes`` reports it.
* 50 generations in a row do not grow the process's resident memory.

test_transform.py already checks the LLaDA cache size by hand and buffer reuse for ``dense``.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

import dyllm_fx
from dyllm_fx.runtime.cache import StepCache
from dyllm_fx.transform import TransformedModel
from policy_helpers import NAMES, build_policy, fresh
from tiny_checkpoints import tiny_tokenizer

TOK = tiny_tokenizer()
PROMPTS = ["rev:abc=", "kv:a1,b2?ab=", "x=1?"]
GEN = dict(gen_length=16, block_length=8, steps=8, stop_at_eos=False, progress=False)


def engine_tensors(model: TransformedModel) -> list[torch.Tensor]:
    """Every tensor buffer the engine holds: the step cache and the policy's buffers (MLP
    outputs, attention contexts, snapshots, ...), found by walking their attributes."""
    engine = model.engine
    found = []
    stack = (
        [*vars(engine.cache).values(), *vars(engine.buffers).values()]
        if engine.buffers is not None
        else list(vars(engine.cache).values())
    )
    while stack:  # lists of tensors, dicts of snapshots, ...
        value = stack.pop()
        if isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, torch.Tensor):
            found.append(value)
    return found


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


# --------------------------------------------------------------------------- allocated once


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_cache_allocated_once_per_generation(programs, monkeypatch, name):
    calls = []
    real = StepCache.allocate.__func__

    def counting(cls, program, batch, seq_len, device):
        calls.append((batch, seq_len))
        return real(cls, program, batch, seq_len, device)

    monkeypatch.setattr(StepCache, "allocate", classmethod(counting))
    model = fresh(programs, "llada", build_policy(name))
    out = dyllm_fx.generate(model, TOK, PROMPTS, **GEN)
    shape = (len(PROMPTS), out.sequences.shape[1])
    assert calls == [shape], f"{out.stats.nfe} steps allocated {len(calls)} caches"
    buffers = [t.data_ptr() for t in engine_tensors(model)]
    dyllm_fx.generate(model, TOK, PROMPTS[::-1], **GEN)  # same shape: every buffer reused
    assert calls == [shape]
    assert [t.data_ptr() for t in engine_tensors(model)] == buffers
    dyllm_fx.generate(model, TOK, PROMPTS[:2], **GEN)  # another shape: one new cache
    assert calls == [shape, (2, shape[1])]


# --------------------------------------------------------------------------- predictable size


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_cache_nbytes_predicts_and_stats_report_the_cache(models, programs, arch):
    model = fresh(programs, arch, build_policy("dense"))
    seq = len(PROMPTS[1]) + GEN["gen_length"]
    predicted = model.cache_nbytes(len(PROMPTS), seq)
    out = dyllm_fx.generate(model, TOK, PROMPTS, **GEN)
    assert out.sequences.shape == (len(PROMPTS), seq)
    assert model.cache.nbytes == predicted == out.stats.cache_bytes
    # by hand: K and V at KV heads (Dream: grouped-query, 2 of 4) + the final hidden state
    cfg = models[arch].config
    if arch == "llada":
        layers, width, kv, head_dim = cfg.n_layers, cfg.d_model, cfg.kv_heads, cfg.d_model // cfg.n_heads
    else:
        layers, width = cfg.num_hidden_layers, cfg.hidden_size
        kv, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    assert kv * head_dim < width or arch == "llada"
    assert predicted == 4 * len(PROMPTS) * seq * (layers * 2 * kv * head_dim + width)
    # an untransformed model has no step cache to report
    assert dyllm_fx.generate(models[arch], TOK, PROMPTS[:1], **GEN).stats.cache_bytes == 0


@pytest.mark.parametrize("name", NAMES)
def test_cache_nbytes_counts_every_engine_buffer(programs, name):
    model = fresh(programs, "dream", build_policy(name))
    out = dyllm_fx.generate(model, TOK, PROMPTS, **GEN)
    assert nbytes(engine_tensors(model)) == model.cache_nbytes(*out.sequences.shape) == out.stats.cache_bytes


# --------------------------------------------------------------------------- no growth over many runs


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc (Linux)")
def test_fifty_generations_do_not_grow_memory(programs):
    buildable = []
    for name in NAMES:
        try:
            buildable.append(fresh(programs, "llada", build_policy(name)))
        except pytest.skip.Exception:
            pass
    kw = dict(GEN, gen_length=8, block_length=4, steps=4)

    def run(i):
        model = buildable[i % len(buildable)]
        prompts = PROMPTS if i % 2 else PROMPTS[:2]  # two shapes: the cache is reallocated every time
        out = dyllm_fx.generate(model, TOK, prompts, seed=i, temperature=1.0, **kw)
        assert len(model.engine.records) == out.stats.nfe  # records are per generation, not kept forever

    for i in range(2 * len(buildable)):  # warm up: every model, both shapes
        run(i)
    gc.collect()
    before = _rss_bytes()
    for i in range(50):
        run(i)
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < 20 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 50 generations"
