"""Every policy's graphed generation against its eager one, token for token (not a benchmark
itself; the graphs stage of ``gpu_acceptance.py``).

On CUDA, ``transform(..., cuda_graphs=True)`` captures each warm step once per plan key and
shape and replays it: its tokens must equal the eager engine's, and a second generation, which
only replays, must too. On a CPU the same call runs the step without capture, so the check
compares the eager engine with the step path that the graphs wrap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from step_timing import with_policy

import dyllm_fx
from dyllm_fx.eval.methods_bench import Method, bench_examples, sampler_params
from dyllm_fx.runtime.policies import BLOCK_SCOPES, POLICIES, ROW_POLICIES

# registered policies that cannot run by name alone, and what they need
NEEDS_ARGUMENTS = {"fixed": "its rows"}
THRESHOLD = 0.9


def acceptance_policies() -> list[str]:
    """Every registered policy that runs by name alone, then every block cache composed with every
    row policy (new policies join the check as they are registered)."""
    singles = [name for name in POLICIES if name not in NEEDS_ARGUMENTS]
    return singles + [f"{block}+{row}" for block in BLOCK_SCOPES for row in ROW_POLICIES]


@dataclass
class GraphCheck:
    """One policy's graphed generation against its eager one."""

    model: str
    dtype: str
    policy: str
    decoding: str
    equal: bool  # the first graphed generation (captures, then replays) gives the eager tokens
    graphs: int  # graphs captured (0 on a CPU)
    replay_equal: bool | None  # a second generation, replays only (None on a CPU)

    @property
    def passed(self) -> bool:
        captured = self.graphs >= 1 and self.replay_equal is True
        return self.equal and (captured or self.replay_equal is None)

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def prompts(n: int = 2) -> list[str]:
    """Held-out task prompts of the embedded models (different lengths: a left-padded batch)."""
    return [example.prompt for example in bench_examples(1)[:n]]


def check_policy(traced, tokenizer, name: str, policy: str, threshold: float | None, gen: dict) -> GraphCheck:
    """Generate with ``policy`` over ``traced``'s program (``dyllm_fx.transform(model)``), eagerly
    and graphed (``gen``: generate's length arguments)."""
    method = Method(policy, policy, threshold=threshold)
    kw = dict(gen, threshold=threshold, stop_at_eos=False, progress=False, **sampler_params(traced, method))
    batch = prompts()
    eager = with_policy(traced, policy)
    graphed = with_policy(traced, policy, cuda_graphs=True)
    want = dyllm_fx.generate(eager, tokenizer, batch, **kw).sequences
    got = dyllm_fx.generate(graphed, tokenizer, batch, **kw).sequences
    on_gpu = want.is_cuda
    again = dyllm_fx.generate(graphed, tokenizer, batch, **kw).sequences if on_gpu else None
    return GraphCheck(
        model=name,
        dtype=str(next(traced.parameters()).dtype).removeprefix("torch."),
        policy=policy,
        decoding=f"threshold {threshold}" if threshold is not None else f"{gen['steps']} steps",
        equal=torch.equal(got, want),
        graphs=len(graphed.engine.graphs),
        replay_equal=None if again is None else torch.equal(again, want),
    )
