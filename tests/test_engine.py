"""The step engine's own mechanics: plans, cache lifetime, custom policies, records."""

from dataclasses import dataclass
from typing import ClassVar

import torch

import dyllm_fx
from dyllm_fx.runtime.policies import FULL, Plan, PlanKey, Policy, StepOutput, StepReport, full_step
from dyllm_fx.runtime.policies.uniform import UniformPolicy
from dyllm_fx.runtime.rows import take, write_rows
from tiny_checkpoints import tiny_llada, tiny_tokenizer


def test_cache_from_generate_is_usable_outside_inference_mode():
    model, tok = tiny_llada(seed=0), tiny_tokenizer()
    fast = dyllm_fx.transform(model)
    out = dyllm_fx.generate(fast, tok, ["rev:abc="], gen_length=8, block_length=4, progress=False)
    with torch.no_grad():  # same shape: the engine reuses the cache generate() allocated
        logits = fast(out.sequences.clone())
        assert torch.allclose(logits, model(out.sequences), atol=1e-5)


class _LastRows(UniformPolicy):
    """A custom uniform policy: the last three positions at every warm step."""

    name = "last_rows"

    def rows(self, host):
        return torch.arange(host.seq_len - 3, host.seq_len).expand(host.batch, -1)


def test_a_custom_uniform_policy_recomputes_its_rows_and_pads_them_to_a_bucket():
    model = tiny_llada(seed=1)
    fast = dyllm_fx.transform(model, policy=_LastRows())
    ids = torch.randint(3, 40, (2, 11))
    with torch.no_grad():
        cold = fast(ids)
        warm = fast(ids)  # same tokens: the recomputed rows equal the cached ones (to float rounding)
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-5)
    torch.testing.assert_close(warm, model(ids), rtol=0, atol=1e-5)
    assert [r.active for r in fast.engine.records][-1] == [3] * model.config.n_layers
    assert fast.engine.records[-1].kind == "rows"


@dataclass(frozen=True)
class _HalfKey(PlanKey):
    kind: ClassVar[str] = "half"


class _HalfMLP(Policy):
    """Every row attends; at warm steps only the even positions get a fresh MLP, the others
    reuse a buffer of MLP outputs the full step filled: a policy with buffers of its own."""

    name = "half_mlp"

    def allocate(self, program, batch, seq_len, device):
        return [torch.zeros(batch, seq_len, program.hidden_size, device=device) for _ in program.kv_shapes]

    def buffer_nbytes(self, program, batch, seq_len):
        return len(program.kv_shapes) * batch * seq_len * program.hidden_size * 4

    def plan(self, host):
        return FULL if host.cold else Plan(_HalfKey())

    def step(self, pieces, plan, inp, cache, buffers):
        if plan.kind == "full":
            return full_step(pieces, inp, cache, lambda r: write_rows(buffers[r.layer], r.rows, r.branch, 1))
        bsz, seq_len = inp.input_ids.shape
        rows = torch.arange(seq_len).expand(bsz, -1)
        even = rows[:, ::2]
        pro = pieces.prologue(inp.input_ids, inp.attention_mask, inp.position_ids)
        x = pro.h0
        for layer in range(pieces.n_layers):
            h_mid, _ = pieces.attention(layer, x, rows, pro, cache)
            write_rows(buffers[layer], even, pieces.mlp(layer, take(h_mid, even, 1), even, pro), 1)
            x = h_mid + buffers[layer]
        cache.hidden.copy_(x)
        return StepOutput(pieces.head(x, rows))

    def observe(self, plan, counts, n_layers, seq_len):
        return StepReport([seq_len if plan.kind == "full" else (seq_len + 1) // 2] * n_layers)


def test_a_policy_with_its_own_buffers_reuses_them():
    model = tiny_llada(seed=1)
    fast = dyllm_fx.transform(model, policy=_HalfMLP())
    ids = torch.randint(3, 40, (2, 11))
    with torch.no_grad():
        cold = fast(ids)  # fills the MLP buffers
        warm = fast(ids)  # same tokens: cached MLP outputs equal fresh ones
        torch.testing.assert_close(warm, cold, rtol=0, atol=1e-6)
        torch.testing.assert_close(warm, model(ids), rtol=0, atol=1e-5)
        assert fast.engine.records[-1].active == [6] * model.config.n_layers
        # a stale buffer must show: zero it, and the odd rows' outputs change
        for buf in fast.engine.buffers:
            buf.zero_()
        assert not torch.allclose(fast(ids), cold, atol=1e-3)
    assert fast.cache_nbytes(2, 11) == fast.allocated_nbytes


def test_swapping_the_policy_starts_cold_with_new_buffers():
    model = tiny_llada(seed=2)
    fast = dyllm_fx.transform(model, policy=_HalfMLP())
    ids = torch.randint(3, 40, (1, 9))
    with torch.no_grad():
        fast(ids)
        fast.engine.policy = _LastRows()
        fast(ids)
    assert fast.engine.records[-1].kind == "full" and fast.engine.buffers is None


def test_eligible_positions_limit_what_the_loop_commits():
    """A step function that withholds a position: the loop never commits it while it is
    withheld, and runs extra steps to finish the block once it is allowed again."""
    model, tok = tiny_llada(seed=3), tiny_tokenizer()
    fast = dyllm_fx.transform(model, policy="dense")
    inner = fast.make_step_function
    withheld = {"steps": 0}

    def make():
        step = inner()

        def call(request):
            out = step(request)
            eligible = torch.ones_like(out.logits[..., 0], dtype=torch.bool)
            if withheld["steps"] < 6:  # the block's first position, for the first six steps
                eligible[:, 0] = False
                withheld["steps"] += 1
            return StepOutput(out.logits, eligible, report=out.report)

        return call

    fast.make_step_function = make
    out = dyllm_fx.generate(
        fast, tok, ["rev:abc="], gen_length=4, block_length=4, steps=4, progress=False, stop_at_eos=False
    )
    assert (out.responses != model.diffusion.mask_token_id).all()  # the block still completes
    assert out.stats.extra_steps > 0 and out.stats.nfe == 4 + out.stats.extra_steps


def test_records_say_what_every_step_did():
    model, tok = tiny_llada(seed=4, n_layers=3), tiny_tokenizer()
    fast = dyllm_fx.transform(model, policy="dual_cache")
    fast.engine.record_activity = True
    out = dyllm_fx.generate(
        fast, tok, ["rev:ab="], gen_length=8, block_length=4, steps=8, progress=False, stop_at_eos=False
    )
    records = fast.engine.records
    assert [r.kind for r in records] == ["full", "span", "span", "span"] * 2
    assert [r.key.kind for r in records] == [r.kind for r in records]  # the plan key each step ran
    plen = out.prompt_length
    assert records[1].activity.shape == (3, 1, plen + 8)
    assert (
        records[1].activity[:, 0, plen : plen + 4].min() == 1 and records[1].activity[:, 0, :plen].max() == 0
    )
    assert records[0].activity.min() == 1  # the block's refresh ran every row
