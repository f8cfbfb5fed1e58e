"""Tensor parallel (``transform(model, tensor_parallel_size=2)``): two gloo ranks on 127.0.0.1,
each holding half of every block's heads and MLP, give the tokens of the whole model in one
process for every policy family, with LLaDA (multi-head), Dream (grouped-query) and LLaDA-MoE
(experts split by their intermediate features) layouts.
Bad sizes are refused before any work, and a rank that fails stops the others."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import dyllm_fx
from dyllm_fx.distributed import spawn
from dyllm_fx.errors import UsageError
from dyllm_fx.models import LLaDAMoEConfig, LLaDAMoEModelLM
from dyllm_fx.passes.tensor_parallel import (
    VocabParallelEmbedding,
    check_shardable,
    collective_group,
    shard_model,
)
from dyllm_fx.runtime.policies import make_policy
from dyllm_fx.transform import TransformedModel
from dyllm_fx.vocab_parallel import VocabShard
from test_llada_moe import random_state, tiny_config
from tiny_checkpoints import tiny_dream, tiny_llada, tiny_tokenizer

PROMPTS = ["rev:abc=", "kv:a1,b2?ab="]
POLICIES = ["dense", "dual_cache", "dyllm", "dllm_cache", "es_dllm", "dual_cache+dyllm"]
SIZE = 2


def _tiny_llada_moe():
    """LLaDA-MoE with a dense first layer, routed experts, expert bias and a shared expert."""
    cfg = tiny_config()
    model = LLaDAMoEModelLM(LLaDAMoEConfig.from_dict(cfg))
    model.load_state_dict(random_state(cfg, seed=13))
    return model.eval()


def _models():
    # a head scaled by 3: wide logit gaps, no near-ties that round-off between layouts could flip
    return {
        "llada": tiny_llada(seed=11, head_scale=3.0, n_layers=4),
        "dream": tiny_dream(seed=12, head_scale=3.0, num_hidden_layers=4),
        "llada_moe": _tiny_llada_moe(),
    }


def _generate(model, threshold=None, **sampling):
    settings = dict(threshold=threshold) if threshold else dict(steps=16, **sampling)
    if threshold and model.diffusion.logits_shift:  # Dream's threshold decoding reads a probability
        settings["alg"] = "maskgit_plus"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dyllm_fx.generate(
            model, tiny_tokenizer(), PROMPTS, gen_length=16, block_length=8, stop_at_eos=False, **settings
        ).sequences


def _with_policy(traced: TransformedModel, name: str) -> TransformedModel:
    return TransformedModel(traced.program, make_policy(name), traced.diffusion)


def _traced(model: TransformedModel) -> TransformedModel:
    model.engine.record_activity = True  # each step's rows per layer, in the engine's records
    return model


def _row_sets(model: TransformedModel) -> list:
    """Per step of the last generation, the rows each layer recomputed or only attended from."""
    return [None if r.activity is None else r.activity.tolist() for r in model.engine.records]


def _compare_on_rank(rank: int, results) -> None:
    torch.set_num_threads(1)
    for arch, model in _models().items():
        whole = dyllm_fx.transform(model)  # traced once each; every policy reuses the program
        shard = dyllm_fx.transform(model, tensor_parallel_size=SIZE)
        assert shard.program.tensor_parallel_group is not None and whole.program.tensor_parallel_group is None
        assert shard.program.vocab_shard is not None  # the head is split over the vocabulary
        for policy in POLICIES:
            for threshold in (None, 0.9):
                one, sharded = _traced(_with_policy(whole, policy)), _traced(_with_policy(shard, policy))
                want, got = _generate(one, threshold), _generate(sharded, threshold)
                # the same tokens, and every layer recomputed the same rows at every step
                same = torch.equal(got, want) and _row_sets(sharded) == _row_sets(one)
                results.put((rank, arch, policy, threshold, same, got.tolist()))
        # sampled: the same seed draws the same tokens from the vocabulary split over the ranks
        sampled = dict(temperature=0.7, seed=11)
        want, got = _generate(whole, **sampled), _generate(shard, **sampled)
        results.put((rank, arch, "dense", "temperature 0.7", torch.equal(got, want), got.tolist()))


@pytest.mark.slow
def test_two_ranks_give_the_tokens_of_the_whole_model():
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    spawn(_compare_on_rank, SIZE, results)
    rows = []
    while not results.empty():
        rows.append(results.get())
    assert len(rows) == SIZE * 3 * (len(POLICIES) * 2 + 1)
    differing = [r[:4] for r in rows if not r[4]]
    assert differing == [], differing
    by_case = {}
    for rank, arch, policy, threshold, _, tokens in rows:
        by_case.setdefault((arch, policy, threshold), []).append(tokens)
    assert all(a == b for a, b in by_case.values())  # every rank holds the same tokens


def _heads_must_divide(rank: int) -> None:
    model = tiny_llada(seed=0, n_heads=3, n_kv_heads=3, d_model=24)
    with pytest.raises(UsageError, match="n_heads=3 does not divide by tensor_parallel_size=2"):
        dyllm_fx.transform(model, policy="dense", tensor_parallel_size=2)


def _fails_on_rank_one(rank: int) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    dist.barrier()  # rank 0 waits on a rank that is gone: spawn must stop it, not hang


def test_sizes_the_heads_do_not_divide_are_refused_on_every_rank():
    spawn(_heads_must_divide, SIZE)


def test_a_failing_rank_stops_the_others_with_its_error():
    """Rank 1 raises; rank 0, waiting on it, fails too instead of hanging. Rank 1's own error is
    meant to reach the caller; on a loaded machine rank 0's report that its peer is gone (the
    socket closed or reset) may still win the race, and names the failure too."""
    import time

    start = time.monotonic()
    with pytest.raises(Exception, match="rank 1 failed on purpose|(closed|reset) by peer"):
        spawn(_fails_on_rank_one, SIZE, timeout_s=60)
    assert time.monotonic() - start < 60


def test_a_server_whose_heads_do_not_divide_is_refused_before_its_ranks_start():
    from dyllm_fx.serving.replicas import ReplicaConfig
    from dyllm_fx.serving.tensor_parallel import serve_tensor_parallel

    with pytest.raises(UsageError, match="n_heads=4 does not divide by tensor_parallel_size=3"):
        serve_tensor_parallel(ReplicaConfig("default", tensor_parallel_size=3))


def test_without_a_process_group_the_error_says_how_to_launch():
    model = tiny_llada(seed=0)
    with pytest.raises(UsageError, match="torchrun --nproc-per-node 2"):
        dyllm_fx.transform(model, policy="dense", tensor_parallel_size=2)


@pytest.mark.parametrize("size", [0, 1.5, True])
def test_bad_sizes_are_refused(size):
    with pytest.raises(UsageError, match="tensor_parallel_size"):
        from dyllm_fx.distributed import group_for

        group_for(size)


def test_the_plan_shards_heads_mlp_and_vocabulary():
    model = tiny_dream(seed=0)  # 4 heads, 2 KV heads, a head of its own
    check_shardable(model, 2)
    shard = shard_model(model, rank=1, size=2, group="g")
    block, whole = shard.parts().blocks[0], model.parts().blocks[0]
    assert (block.n_heads, block.n_kv_heads) == (2, 1)
    assert torch.equal(block.self_attn.q_proj.weight, whole.self_attn.q_proj.weight[16:])
    assert torch.equal(block.self_attn.o_proj.weight, whole.self_attn.o_proj.weight[:, 16:])
    assert torch.equal(block.self_attn.q_proj.bias, whole.self_attn.q_proj.bias[16:])
    assert model.parts().blocks[0].n_heads == 4  # the original is not changed
    embedding, rows = shard.parts().embedding, model.config.vocab_size // 2
    assert isinstance(embedding, VocabParallelEmbedding) and embedding.start == rows
    assert torch.equal(embedding.weight, model.parts().embedding.weight[rows:])
    # the LM head keeps its half of the vocabulary, and the spec says which half
    assert torch.equal(shard.lm_head.weight, model.lm_head.weight[rows:])
    assert shard.diffusion.vocab_shard == VocabShard(rows, rows, model.config.vocab_size, "g")
    assert model.diffusion.vocab_shard is None
    with pytest.raises(UsageError, match="n_kv_heads=2 does not divide by tensor_parallel_size=4"):
        check_shardable(model, 4)


def test_the_vocabulary_split_embedding_sums_to_the_whole_lookup():
    """Each rank's lookup holds its own vocabulary range and zeros; their sum (the all-reduce,
    done by hand here) is the whole embedding's, exactly. A head tied to the embedding reads
    every row: that embedding stays whole."""
    model = tiny_llada(seed=0)
    ids = torch.arange(model.config.vocab_size).reshape(1, -1)
    shards = [shard_model(model, rank=r, size=2, group=None).parts().embedding for r in range(2)]
    assert torch.equal(shards[0](ids) + shards[1](ids), model.parts().embedding(ids))
    tied = shard_model(tiny_dream(seed=0, tie_word_embeddings=True), rank=0, size=2, group=None)
    assert not isinstance(tied.parts().embedding, VocabParallelEmbedding)
    assert tied.diffusion.vocab_shard is None  # its head stays whole too


def test_an_unsharded_graph_has_no_group():
    from dyllm_fx.passes.capture import capture_module

    assert collective_group(capture_module(tiny_llada(seed=0)).gm.graph) is None


def test_the_experts_keep_their_slice_and_the_router_stays_whole():
    model = _tiny_llada_moe()
    shard = shard_model(model, rank=0, size=2, group="g")
    moe, whole = shard.parts().blocks[1].mlp, model.parts().blocks[1].mlp
    assert torch.equal(moe.gate.weight, whole.gate.weight)
    assert torch.equal(moe.gate_proj, whole.gate_proj[:, :8]) and torch.equal(
        moe.down_proj, whole.down_proj[:, :, :8]
    )
    assert moe.reduce is not None and whole.reduce is None
    # the attention output's bias (attention_bias) enters the sum once: rank 0 holds it
    o_proj = shard.parts().blocks[1].self_attn.o_proj
    assert torch.equal(o_proj.bias, model.parts().blocks[1].self_attn.o_proj.bias)
    assert shard_model(model, rank=1, size=2, group="g").parts().blocks[1].self_attn.o_proj.bias is None
    dense = shard.parts().blocks[0].mlp  # the first layer is dense: a plain colwise / rowwise MLP
    assert dense.gate_proj.out_features == 24 and dense.down_proj.weight.shape == (32, 24)


def _serve_script(engine) -> dict:
    """What a server's engine meets: two requests, steps, a late request on another block clock,
    a cancellation, an idle moment; returns each request's final tokens and finish reason."""
    from dyllm_fx import SamplingParams

    finals = {}

    def step():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].finish_reason)

    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=16, block_length=8), "a")
    engine.add_request(PROMPTS[1], SamplingParams(max_tokens=16, block_length=8), "b")
    step()
    step()
    engine.add_request(PROMPTS[1], SamplingParams(max_tokens=16, block_length=16), "c")
    engine.abort("b")
    engine.idle()
    while engine.has_unfinished():
        step()
    return finals


def _followed(engine, mirror) -> dict:
    """``follow`` on ``engine``, recording the outputs it drops."""
    from dyllm_fx.serving.mirror import follow

    finals, step = {}, engine.step

    def recording_step():
        outs = step()
        finals.update({o.request_id: (o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs})
        return outs

    engine.step = recording_step
    follow(engine, mirror)
    return {k: v for k, v in finals.items() if v[1] is not None}


def _llm_on_rank(rank: int, results) -> None:
    from dyllm_fx import LLM, SamplingParams
    from dyllm_fx.serving.mirror import EngineMirror

    torch.set_num_threads(1)
    params = SamplingParams(max_tokens=16, block_length=8)
    whole_llm = LLM("default", policy="dual_cache")
    shard_llm = LLM("default", policy="dual_cache", tensor_parallel_size=SIZE)
    whole, shard = whole_llm.generate(PROMPTS, params), shard_llm.generate(PROMPTS, params)
    same = [a.outputs[0].token_ids == b.outputs[0].token_ids != [] for a, b in zip(whole, shard)]
    # dyllm serve --tensor-parallel-size: rank 0's engine leads, rank 1's follows its journal
    mirror = EngineMirror()
    if rank == 0:
        shard_llm.engine.mirror = mirror
        served = _serve_script(shard_llm.engine)
        mirror.close()
    else:
        served = _followed(shard_llm.engine, mirror)
    results.put((rank, same, served, _serve_script(LLM("default", policy="dual_cache").engine)))


@pytest.mark.slow
def test_llm_with_two_ranks_answers_as_the_whole_model():
    """vLLM's ``LLM(..., tensor_parallel_size=2)``: the embedded model's completions, on each rank;
    and a serving engine's requests, late joins and cancellations, mirrored step for step by the
    other rank (``dyllm serve --tensor-parallel-size 2``), end as on the whole model."""
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    spawn(_llm_on_rank, SIZE, results)
    rows = sorted(results.get() for _ in range(SIZE))
    assert [same for _, same, _, _ in rows] == [[True, True]] * SIZE
    (_, _, leader, whole), (_, _, follower, _) = rows
    assert sorted(whole) == ["a", "b", "c"] and whole["b"][1] == "abort" and whole["c"][0]
    assert leader == whole
    assert follower == leader


def _load_shard_on_rank(rank: int, folder: str, results) -> None:
    torch.set_num_threads(1)
    whole, tok = dyllm_fx.load(folder)
    shard, _ = dyllm_fx.load(folder, tensor_parallel_size=SIZE)
    held = sum(p.numel() for p in shard.parts().blocks.parameters())
    full = sum(p.numel() for p in whole.parts().blocks.parameters())
    ids = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    vocab = shard.diffusion.vocab_shard  # each rank's logits: its half of the vocabulary
    with torch.no_grad():
        diff = (shard(ids) - whole(ids)[..., vocab.start : vocab.start + vocab.rows]).abs().max().item()
    same = dyllm_fx.transform(shard, tensor_parallel_size=SIZE)  # not sharded twice
    results.put((rank, held, full, diff, same.program.tensor_parallel_group is not None))


@pytest.mark.slow
@pytest.mark.parametrize("sharded_files", [False, True])
def test_each_rank_loads_only_its_slices(tmp_path, sharded_files):
    """``load(folder, tensor_parallel_size=2)``: each rank reads its slices of the safetensors
    (about half the blocks' weights, bias on rank 0 only) and computes its half of the whole
    model's logits."""
    import torch.multiprocessing as mp

    from tiny_checkpoints import write_model

    folder = write_model(tiny_dream(seed=5), tmp_path / "dream", sharded=sharded_files)
    results = mp.get_context("spawn").SimpleQueue()
    spawn(_load_shard_on_rank, SIZE, str(folder), results)
    rows = sorted(results.get() for _ in range(SIZE))
    for rank, held, full, diff, transformed in rows:
        assert full / 2 <= held < full * 0.6, (rank, held, full)  # the norms stay whole
        assert diff < 1e-4 and transformed


def _compiled_on_rank(rank: int, results) -> None:
    torch.set_num_threads(1)
    model = tiny_llada(seed=11, head_scale=3.0, n_layers=4)
    for policy in ("es_dllm", "dual_cache+dyllm"):
        eager = dyllm_fx.transform(model, policy=policy, tensor_parallel_size=SIZE)
        compiled = dyllm_fx.transform(model, policy=policy, tensor_parallel_size=SIZE, compile="aot_eager")
        results.put((rank, policy, torch.equal(_generate(compiled), _generate(eager))))


@pytest.mark.slow
def test_the_sharded_step_compiles_whole():
    """The sharded step, its all-reduces and the vocabulary reductions ES-dLLM runs inside it
    (max, min, sum over the ranks) compile with ``fullgraph=True`` and give the eager tokens."""
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    spawn(_compiled_on_rank, SIZE, results)
    rows = [results.get() for _ in range(SIZE * 2)]
    assert all(same for *_, same in rows), rows
