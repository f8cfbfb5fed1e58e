"""The one denoising spine (``runtime/block_decoder.py``): the commit rule, the commit summary,
the block clock, and the host information a :class:`StepRequest` carries to the engine."""

from __future__ import annotations

import torch

from dyllm_fx.models.spec import DiffusionSpec
from dyllm_fx.runtime.block_decoder import BlockDecoder, commit_rule, commit_summary, sampler_select
from dyllm_fx.runtime.policies import StepOutput
from dyllm_fx.runtime.samplers import LLaDASampler, Selection
from dyllm_fx.runtime.step import SparseStep, StepRequest

MASK, V = 9, 10


def _selection(transfer, confidence) -> Selection:
    transfer = torch.tensor(transfer)
    return Selection(transfer, torch.zeros_like(transfer, dtype=torch.long), torch.tensor(confidence))


def test_commit_rule_commits_the_best_allowed_token_only_past_the_schedule():
    allowed = torch.tensor([[True, True, False], [False, False, False]])
    nothing = _selection([[False, False, False], [False, False, False]], [[0.1, 0.5, 0.9], [0.3, 0.2, 0.1]])
    assert not commit_rule(nothing, allowed, past_schedule=False).any()
    best = commit_rule(nothing, allowed, past_schedule=True)
    assert best.tolist() == [[False, True, False], [False, False, False]]  # row 1 has nothing allowed
    chosen = _selection([[True, False, True], [False, False, False]], [[0.1, 0.5, 0.9], [0.3, 0.2, 0.1]])
    assert commit_rule(chosen, allowed, past_schedule=True).tolist() == [
        [True, False, False],
        [False, False, False],
    ]


def test_commit_summary_reads_most_leftmost_and_total():
    transfer = torch.tensor([[False, True, True], [False, False, False]])
    assert commit_summary(transfer, 5) == (2, (6, None), 2)


def _decoder(steps_per_block: int | None, rows: int = 2, block: int = 4) -> BlockDecoder:
    decoder = BlockDecoder(MASK, block, steps_per_block)
    x = torch.cat([torch.ones(rows, 3, dtype=torch.long), torch.full((rows, 2 * block), MASK)], 1)
    decoder.lay_out(x, None, response_start=3)
    decoder.begin_block(0, 3)
    return decoder


def _step_fn(seen: list):
    def step(request: StepRequest):
        seen.append(request)
        logits = torch.zeros(request.input_ids.shape[0], request.block_end - request.block_start, V)
        logits[..., 2] = 5.0  # every position predicts token 2
        return logits

    return step


def test_a_fixed_schedule_decodes_its_block_and_the_requests_carry_the_clock():
    decoder, seen = _decoder(steps_per_block=2), []
    select = sampler_select(LLaDASampler())
    while decoder.block_continues():
        done = decoder.step(_step_fn(seen), select, evaluations=2)
        assert done.committed == 4 and not done.past_schedule  # two rows, two tokens each
    assert decoder.window.tolist() == [[2] * 4] * 2 and decoder.nfe == 4
    assert [(r.step_in_block, r.nfe, r.response_start, r.relayout) for r in seen] == [
        (0, 0, 3, False),
        (1, 2, 3, False),
    ]
    assert seen[1].last_committed == 2 and seen[1].last_leftmost is not None
    decoder.begin_block(1, decoder.end)
    assert decoder.start == 7 and decoder.initial.tolist() == [4, 4]


def test_a_re_layout_after_a_step_is_cold_once_and_forgets_the_last_commits():
    decoder, seen = _decoder(steps_per_block=4), []
    decoder.step(_step_fn(seen), sampler_select(LLaDASampler()))
    decoder.lay_out(decoder.x.clone(), None, response_start=3)
    assert decoder.relayout and decoder.last == (0, None)
    decoder.step(_step_fn(seen), sampler_select(LLaDASampler()))
    assert [r.relayout for r in seen] == [False, True] and not decoder.relayout


def test_the_block_ends_when_no_row_is_live_even_inside_the_schedule():
    decoder = _decoder(steps_per_block=4)
    assert decoder.block_continues(torch.tensor([True, False]))
    assert not decoder.block_continues(torch.tensor([False, False]))


def test_threshold_decoding_stops_when_the_live_rows_are_decoded():
    decoder = _decoder(steps_per_block=None)
    decoder.x[0, 3:7] = 2  # row 0's block is decoded, row 1's is not
    assert decoder.block_continues()
    assert not decoder.block_continues(torch.tensor([True, False]))


class _RecordingEngine:
    def __init__(self):
        self.calls, self.resets = [], 0

    def reset(self):
        self.resets += 1

    def step(self, input_ids, attention_mask, position_ids, logit_positions, **host_info):
        self.calls.append(host_info)
        return StepOutput(torch.zeros(input_ids.shape[0], logit_positions.shape[1], V))


def test_sparse_step_passes_the_request_s_response_start_and_relayout_to_the_engine():
    engine = _RecordingEngine()
    step = SparseStep(engine, DiffusionSpec(mask_token_id=MASK))
    x = torch.full((1, 12), MASK)
    pos = torch.arange(12)[None]
    step(StepRequest(x, None, pos, 0, 4, 8, 0, 0))
    step(StepRequest(x, None, pos, 1, 8, 12, 0, 1, response_start=2, relayout=True))
    assert engine.resets == 1
    assert (engine.calls[0]["response_start"], engine.calls[0]["relayout"]) == (4, False)
    assert (engine.calls[1]["response_start"], engine.calls[1]["relayout"]) == (2, True)
