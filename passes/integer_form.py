"""``Q``: how ``integer_only`` represents a float value as integers (shared with the converters of
``integer_tokens``, which ``integer_only`` calls for the ops token_merge inserts)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.ir import Value


@dataclass
class Q:
    """An integer representation of a float value: real = (stored - zp) * scale (+ offset).
    ``scale``/``offset`` are float64 tensors broadcastable against the value (0-d when per tensor)."""
    value: Value
    scale: torch.Tensor
    offset: torch.Tensor | None
    zp: int
    bound: int          # max |stored - zp|, guaranteed statically
    kind: str           # u8 | i8 | i32 | acc | prob

    @property
    def per_tensor(self) -> bool:
        return self.scale.numel() == 1 and (self.offset is None or self.offset.numel() == 1)
