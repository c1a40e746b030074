"""Builds and loads ``cpu_integer_edges.c`` (int.quantize / int.dequantize, the float edges of an integer
graph) like the other C kernels (cached under ``~/.cache/graphopt/cpu_integer_edges``), and wraps it."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import torch

from graphopt.backends.c_build import FLAGS, load

SOURCE = Path(__file__).with_name("cpu_integer_edges.c")
TYPES = {torch.uint8: 0, torch.int8: 1, torch.int32: 2}


@functools.cache
def library() -> ctypes.CDLL:
    lib = load(SOURCE, "cpu_integer_edges", "the quantize/dequantize kernels", FLAGS + ["-ffp-contract=off"])
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    lib.ge_quantize.argtypes = [p, i64, f32, f32, f32, i32, ctypes.c_int, p, ctypes.c_int]
    lib.ge_dequantize.argtypes = [p, ctypes.c_int, i64, i64, i32, p, p, p, ctypes.c_int]
    lib.ge_quantize_patches.argtypes = [p, i64, i64, i64, i64, i64, i64, f32, f32, f32, i32, ctypes.c_int, p, ctypes.c_int]
    lib.ge_quantize.restype = lib.ge_dequantize.restype = lib.ge_quantize_patches.restype = None
    return lib


def quantize(x: torch.Tensor, inv_scale: float, lo: int, hi: int, zero_point: int, dtype: torch.dtype,
             threads: int) -> torch.Tensor:
    """int.quantize: clamp(floor(x * inv_scale + 0.5), lo, hi) + zero_point, float32 math."""
    x = x.float().contiguous()
    out = torch.empty(x.shape, dtype=dtype)
    library().ge_quantize(x.data_ptr(), x.numel(), inv_scale, *_float32_bounds(lo, hi), zero_point, TYPES[dtype],
                          out.data_ptr(), threads)
    return out


def _float32_bounds(lo: int, hi: int) -> tuple[float, float]:
    """The float32 values torch.clamp compares with (rounded to nearest)."""
    return float(np.float32(lo)), float(np.float32(hi))


def quantize_patches(x: torch.Tensor, patch: tuple[int, int], inv_scale: float, lo: int, hi: int, zero_point: int,
                     dtype: torch.dtype, threads: int) -> torch.Tensor:
    """quantize(x) of an image batch [B, C, H, W] laid out as its ph x pw patches: [B, H/ph, W/pw, C, ph, pw]."""
    x = x.float().contiguous()
    (B, C, H, W), (ph, pw) = x.shape, patch
    out = torch.empty((B, H // ph, W // pw, C, ph, pw), dtype=dtype)
    library().ge_quantize_patches(x.data_ptr(), B, C, H, W, ph, pw, inv_scale, *_float32_bounds(lo, hi), zero_point,
                                  TYPES[dtype], out.data_ptr(), threads)
    return out


def dequantize(x: torch.Tensor, zero_point: int, scale: torch.Tensor, offset: torch.Tensor | None,
               threads: int) -> torch.Tensor:
    """int.dequantize with float32 scale (and offset) vectors along the last axis."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    c = x.shape[-1] if x.dim() else 1
    library().ge_dequantize(x.data_ptr(), TYPES[x.dtype], x.numel() // max(c, 1), c, zero_point, scale.data_ptr(),
                            None if offset is None else offset.data_ptr(), out.data_ptr(), threads)
    return out
