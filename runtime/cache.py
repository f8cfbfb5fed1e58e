"""The per-generation cache the sparse step reads and writes.

Per layer l: K and V of every position (B, KV, L, d) and the layer's input hidden state
(B, L, D) (``hidden[l]``; ``hidden[n_layers]`` is the final one the LM head reads). Allocated
once per generation; rows that are not active at a step keep what an earlier step wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepCache:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    hidden: list[torch.Tensor]
    batch: int
    seq_len: int
    warm: bool = False  # False until one full step has filled every row

    @classmethod
    def allocate(cls, program, batch: int, seq_len: int, device: torch.device) -> "StepCache":
        k, v = [], []
        for k_shape, v_shape in program.kv_shapes:
            k.append(torch.zeros(batch, k_shape[0], seq_len, k_shape[1], dtype=program.kv_dtype, device=device))
            v.append(torch.zeros(batch, v_shape[0], seq_len, v_shape[1], dtype=program.kv_dtype, device=device))
        hidden = [
            torch.zeros(batch, seq_len, program.hidden_size, dtype=program.hidden_dtype, device=device)
            for _ in range(len(program.kv_shapes) + 1)
        ]
        return cls(k, v, hidden, batch, seq_len)

    @staticmethod
    def predicted_nbytes(program, batch: int, seq_len: int) -> int:
        """Bytes ``allocate`` will take, from the program's shapes alone."""
        item = torch.empty((), dtype=program.kv_dtype).element_size()
        kv = sum(batch * seq_len * (ks[0] * ks[1] + vs[0] * vs[1]) for ks, vs in program.kv_shapes) * item
        h_item = torch.empty((), dtype=program.hidden_dtype).element_size()
        return kv + (len(program.kv_shapes) + 1) * batch * seq_len * program.hidden_size * h_item

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, *self.hidden))

    def fits(self, batch: int, seq_len: int, device: torch.device) -> bool:
        return self.batch == batch and self.seq_len == seq_len and self.k[0].device == device
