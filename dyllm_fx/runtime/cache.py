"""The per-generation cache every step reads and writes.

Per layer l: K and V of every position (B, KV, L, d); and the final hidden state (B, L, D) the
LM head reads, so a step that recomputes some rows can still produce logits at the others.
Policies keep what else they need (attention contexts, MLP outputs, snapshots) in buffers of
their own (``Policy.allocate``). Allocated once per (batch, length) and reused; rows a step
does not recompute keep what an earlier step wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepCache:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    hidden: torch.Tensor
    batch: int
    seq_len: int
    warm: bool = False  # False until one full step has filled every row
    # (n_layers, B, L) what each layer did to each row this step (1 recomputed, 0.5 attention
    # only, 0 cached), filled when the engine traces steps (``rows.mark``); None: not traced
    activity: torch.Tensor | None = None

    @classmethod
    def allocate(cls, program, batch: int, seq_len: int, device: torch.device) -> "StepCache":
        k, v = [], []
        for k_shape, v_shape in program.kv_shapes:
            k.append(
                torch.zeros(batch, k_shape[0], seq_len, k_shape[1], dtype=program.kv_dtype, device=device)
            )
            v.append(
                torch.zeros(batch, v_shape[0], seq_len, v_shape[1], dtype=program.kv_dtype, device=device)
            )
        hidden = torch.zeros(batch, seq_len, program.hidden_size, dtype=program.hidden_dtype, device=device)
        return cls(k, v, hidden, batch, seq_len)

    @staticmethod
    def predicted_nbytes(program, batch: int, seq_len: int) -> int:
        """Bytes ``allocate`` will take, from the program's shapes alone."""
        item = torch.empty((), dtype=program.kv_dtype).element_size()
        kv = sum(batch * seq_len * (ks[0] * ks[1] + vs[0] * vs[1]) for ks, vs in program.kv_shapes) * item
        h_item = torch.empty((), dtype=program.hidden_dtype).element_size()
        return kv + batch * seq_len * program.hidden_size * h_item

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, self.hidden]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def fits(self, batch: int, seq_len: int, device: torch.device) -> bool:
        return self.batch == batch and self.seq_len == seq_len and self.k[0].device == device
