"""Builds and loads ``cpu_integer_tokens.c`` (integer token merging) like the other C kernels (cached under
``~/.cache/graphopt/cpu_integer_tokens``) and wraps it for torch tensors."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from graphopt.backends.c_build import load

SOURCE = Path(__file__).with_name("cpu_integer_tokens.c")
I32 = torch.int32
KEY_TYPES = {torch.uint8: 0, torch.int8: 1, I32: 2}


@functools.cache
def library() -> ctypes.CDLL:
    lib = load(SOURCE, "cpu_integer_tokens", "the integer token-merging kernel")
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.gt_token_merge.argtypes = [p, p, ctypes.c_int, i64, i64, i64, i64, i64, p, i64, i64, i64, i64, i64, i64,
                                   ctypes.c_int32, p, p, ctypes.c_int]
    lib.gt_token_merge.restype = ctypes.c_int
    return lib


def token_merge(x: torch.Tensor, keys: torch.Tensor, sizes: torch.Tensor, r: int, protected: int, shift: int,
                threads: int, heads_axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """int.token_merge with the effective r (0 < r <= (tokens - protected) // 2): x i32 [B, N, C], keys
    i8/u8/i32 [B, N, d], sizes i32 [B, N, 1] -> (x' [B, N - r, C], sizes' [B, N - r, 1]). With ``heads_axis``
    (1 or 2), the keys are the int32 sum over that axis of a 4-D view; keys are read in place, any strides."""
    b, n, c = x.shape
    x, sizes = x.contiguous(), sizes.contiguous()
    keys = keys.movedim(heads_axis, 2) if heads_axis else keys.unsqueeze(2)
    out = torch.empty(b, n - r, c, dtype=I32)
    out_sizes = torch.empty(b, n - r, 1, dtype=I32)
    status = library().gt_token_merge(x.data_ptr(), keys.data_ptr(), KEY_TYPES[keys.dtype], keys.shape[2], *keys.stride(),
                                      sizes.data_ptr(), b, n, c, keys.shape[-1], r, protected, min(shift, 31),
                                      out.data_ptr(), out_sizes.data_ptr(), threads)
    if status:
        raise ValueError("cpu.int_token_merge: a token size is below 1 (sizes are token counts)")
    return out, out_sizes
