"""Timing one denoising step of a transformed model against the untransformed forward (shared by
``step_sparsity.py`` and ``step_gpu.py``; not a benchmark itself).

A *case* is a transformed model plus how its warm steps are driven: the engine is called as the
denoising loop calls it (block, response start, what the last step committed), and DyLLM cases
get ``n`` changed tokens every step (``synthetic.changed_tokens``), so each step recomputes the
rows it would in steady state. ``commits`` stands for the decoding: one token a step, or the
several a step that threshold decoding commits (the step is told it, and a DyLLM case sees at
least that many changed tokens). A sample is the mean step time over a group of ``GROUP`` steps
(DyLLM queries the whole sequence every 4th step: a group holds one of those).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from synthetic import changed_tokens

import dyllm_fx
from dyllm_fx import TransformedModel
from dyllm_fx.runtime.policies import family_of, make_policy

GROUP = 4


@dataclass
class Case:
    label: str
    model: torch.nn.Module  # a TransformedModel, or the untransformed model ("vanilla")
    changed: int = 0  # tokens changed every step (DyLLM), 0: the same tokens
    samples: list[float] = field(default_factory=list)  # ms per step

    @property
    def vanilla(self) -> bool:
        return not hasattr(self.model, "engine")


class Driver:
    """Runs steps of one case on fixed inputs: (batch, seq) tokens, the block [block, block + 32)."""

    def __init__(
        self,
        case: Case,
        ids: torch.Tensor,
        block: tuple[int, int],
        response_start: int,
        vocab: int,
        mask_id: int,
        commits: int = 1,
    ):
        self.case, self.ids, self.block, self.response_start = case, ids, block, response_start
        self.vocab, self.mask_id, self.step, self.commits = vocab, mask_id, 0, commits
        seq = ids.shape[1]
        self.pos = torch.arange(seq, device=ids.device)[None].expand(ids.shape[0], -1)
        self.logit_pos = torch.arange(*block, device=ids.device)[None].expand(ids.shape[0], -1)

    def __call__(self) -> None:
        case = self.case
        if case.vanilla:
            case.model(self.ids, position_ids=self.pos)
            return
        ids, changed = self.ids, max(case.changed, self.commits) if case.changed else 0
        if changed:  # the response's tokens change at ``changed`` positions every step
            ids = changed_tokens(
                self.ids, self.response_start, self.ids.shape[1], changed, self.step, self.vocab
            )
        case.model.engine.step(
            ids,
            None,
            self.pos,
            self.logit_pos,
            step=self.step,
            block_start=self.block[0],
            block_end=self.block[1],
            response_start=self.response_start,
            mask_token_id=self.mask_id,
            last_committed=max(case.changed, self.commits),
        )
        self.step += 1


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_cases(drivers: list[Driver], rounds: int, warmup: int, device: str, log: Callable = print) -> None:
    """Round-robin over the cases (machine noise hits all of them alike); every round times one
    group of ``GROUP`` steps per case."""
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for d in drivers:
                sync(device)
                start = time.perf_counter()
                for _ in range(GROUP):
                    d()
                sync(device)
                if r >= warmup:
                    d.case.samples.append(1e3 * (time.perf_counter() - start) / GROUP)
            log(f"round {r + 1}/{warmup + rounds}")


def median_ms(case: Case) -> float:
    return statistics.median(case.samples)


def transform(model, policy, compile: bool, cuda_graphs: bool = False):
    return dyllm_fx.transform(model, policy=policy, compile=compile, cuda_graphs=cuda_graphs)


def with_policy(traced: TransformedModel, policy, compile: bool = False, cuda_graphs: bool = False):
    """``traced``'s step program under another policy (a name, with the model family's presets, or
    a policy object): what ``dyllm_fx.transform(model, policy=...)`` gives, without tracing the
    model again (seconds each time; the program is the same for every policy)."""
    chosen = make_policy(policy, family=family_of(traced.diffusion))
    chosen.check_model(len(traced.program.attn))
    return TransformedModel(
        traced.program, chosen, traced.diffusion, compile=compile, cuda_graphs=cuda_graphs
    )
