"""The module ``dyllm_fx.transform`` returns: a dLLM whose step runs on the sparse-step engine."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ..models.layers import default_position_ids
from ..models.spec import DiffusionSpec
from ..passes.split_pieces import StepProgram
from ..runtime.cache import StepCache
from ..runtime.engine import StepEngine
from ..runtime.policies import Policy
from ..runtime.step import SparseStep


class TransformedModel(nn.Module):
    """A dLLM rewritten into a cache-backed, token-sparse step.

    ``forward(input_ids, attention_mask, position_ids)`` keeps the original signature and
    returns logits for every position (the cache persists across calls of one generation).
    The denoising loop instead calls ``make_step_function()``, whose steps compute the LM head
    only for the current block.

    ``block_length`` tells ``forward()`` the block layout of the generation it is called in
    (the denoising loop passes the block itself); None: the whole response is one block. The
    logits ``forward()`` returns carry ``commit_mask``: (B, L) bool of the positions whose logits
    come from rows that ran every layer (None: all), which ``DenseStep`` passes on to the loop.
    On a tensor-parallel shard whose head is split over the vocabulary (``diffusion.vocab_shard``
    set), the logits are this rank's columns of the vocabulary; ``dyllm_fx.vocab_parallel`` reads
    them (``gather_vocab`` gives the whole vocabulary's).
    """

    def __init__(
        self,
        program: StepProgram,
        policy: Policy,
        spec: DiffusionSpec | None,
        compile: bool | str = False,
        cuda_graphs: bool = False,
        block_length: int | None = None,
    ):
        super().__init__()
        self.program = program
        self.diffusion = spec
        # a tensor-parallel head split over the vocabulary: the policies reading logits inside
        # the step (ES-dLLM) reduce over the ranks as the sampler does
        program.vocab_shard = getattr(spec, "vocab_shard", None)
        self.engine = StepEngine(program, policy, compile=compile, cuda_graphs=cuda_graphs)
        self.block_length = block_length
        # Registered so .parameters() / .to() see the shared weights once.
        self.pieces = nn.ModuleList(
            [
                program.prologue,
                *(p.gm for p in program.attn),
                *(p.gm for p in program.mlp),
                program.epilogue.gm,
            ]
        )
        self._last_ids: torch.Tensor | None = None
        self._response_start: int | None = None
        self.eval()  # an inference module, like the eval-mode model it was traced from

    def _apply(self, fn, recurse=True):
        # The traced pieces and the engine's caches are fixed to the traced dtype: a cast
        # would fail deep inside the first step. Refuse it here, naming the way that works.
        params = [p for p in self.parameters() if p.is_floating_point()]
        if params:
            probe = torch.empty(0, dtype=params[0].dtype, device=params[0].device)
            after = fn(probe)
            if isinstance(after, torch.Tensor) and after.dtype != probe.dtype:
                raise UsageError(
                    f"a TransformedModel is traced in {probe.dtype} and cannot be cast to {after.dtype}; "
                    "cast the "
                    f"original model and transform it again: dyllm_fx.transform(model.to({after.dtype}), "
                    "policy=...)"
                )
        return super()._apply(fn, recurse)

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    @property
    def cache(self) -> StepCache | None:
        return self.engine.cache

    def cache_nbytes(self, batch: int, seq_len: int) -> int:
        """Bytes of cache a generation of this batch x sequence length allocates: K/V and the
        final hidden state per layer, plus the policy's own buffers."""
        return self.engine.predicted_nbytes(batch, seq_len)

    @property
    def allocated_nbytes(self) -> int:
        """Bytes the engine's caches hold now (0 before the first step)."""
        return self.engine.allocated_nbytes

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if input_ids.is_floating_point() or input_ids.is_complex():
            raise TypeError(
                f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; pass ids.long()"
            )
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        continues = self._continues(input_ids)
        if not continues:
            self.engine.reset()
            self._response_start = self._first_mask(input_ids)
        info = self._host_info(input_ids, self._last_ids if continues else None)
        self._last_ids = input_ids.clone()
        bsz, seq_len = input_ids.shape
        everywhere = torch.arange(seq_len, device=input_ids.device).expand(bsz, -1)
        out = self.engine.step(input_ids, attention_mask, position_ids, everywhere, **info)
        # Which positions may be committed (ES-dLLM: rows that ran every layer) travels with the
        # logits, so a loop that only sees forward()'s output (DenseStep) can honour it.
        out.logits.commit_mask = out.eligible
        return out.logits

    def _first_mask(self, input_ids: torch.Tensor) -> int | None:
        """The first column holding a mask token (the response start of a new generation)."""
        if self.diffusion is None:
            return None
        cols = (input_ids == self.diffusion.mask_token_id).any(0).nonzero()
        return int(cols[0]) if cols.numel() else None

    def _host_info(self, input_ids: torch.Tensor, last: torch.Tensor | None) -> dict:
        """What the engine's policies need about the generation, inferred from the tokens, as
        the denoising loop would tell them: the response start (the first masked column when it
        began), the current block (the one holding the leftmost mask), and what the last step
        committed (the tokens that differ from the last call's)."""
        spec, start = self.diffusion, self._response_start
        if spec is None or start is None:
            return {"step": len(self.engine.records)}
        seq_len = input_ids.shape[1]
        length = self.block_length or seq_len - start
        masked = (input_ids[:, start:] == spec.mask_token_id).any(0).nonzero()
        offset = int(masked[0]) if masked.numel() else seq_len - start - 1
        block_start = start + offset // length * length
        info = {
            "step": len(self.engine.records),
            "block_start": block_start,
            "block_end": min(block_start + length, seq_len),
            "response_start": start,
            "mask_token_id": spec.mask_token_id,
            "logits_shift": spec.logits_shift,
        }
        if last is not None:
            committed = last != input_ids
            cols = torch.arange(seq_len, device=input_ids.device)
            left = torch.where(committed, cols, seq_len).amin(-1)
            most, *leftmost = torch.cat([committed.sum(-1).amax()[None], left]).tolist()
            info.update(
                last_committed=most, last_leftmost=tuple(c if c < seq_len else None for c in leftmost)
            )
        return info

    def _continues(self, input_ids: torch.Tensor) -> bool:
        """Same generation iff no already-decoded token changed (tokens only go mask -> token)
        and no generate() ran since the last call (``make_step_function`` forgets the ids)."""
        last = self._last_ids
        if last is None or last.shape != input_ids.shape or self.diffusion is None:
            return False
        decoded = last != self.diffusion.mask_token_id
        return bool((last[decoded] == input_ids[decoded]).all())

    def make_step_function(self) -> SparseStep:
        if self.diffusion is None:
            raise TypeError("this model has no `diffusion` spec; pass spec=DiffusionSpec(...) to transform()")
        self._last_ids = None  # a generation's steps are not a continuation of forward() calls
        return SparseStep(self.engine, self.diffusion)

    def explain(self) -> str:
        from ..explain import explain

        return explain(self)

    def print_graph(self) -> None:
        print(self.explain())


__all__ = ["TransformedModel"]
