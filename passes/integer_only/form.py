"""``Q``: how ``integer_only`` represents a float value as integers (shared by the conversion and the
converters of ``tokens``, which it calls for the ops token_merge inserts)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.ir import Value

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_float(v: Value | None) -> bool:
    return v is not None and v.type.dtype in FLOAT_DTYPES


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
