"""Builds and loads ``cpu_sparse_kernels.c`` (the CSR / 1x4-block SpMM kernels) with the system C compiler,
cached like the cpu_integer kernels (``~/.cache/graphopt/cpu_sparse``), and wraps them for torch tensors.

``spmm_f32`` is what the ``torch`` backend runs for ``sparse_linear`` on CPU tensors (registered in
``backends/sparse_kernels.py``); ``spmm_s8`` is the int8 1x4-block kernel with the ``int.requant``
epilogue that integer-only graphs can use.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from graphopt.backends.c_build import KernelBuildError, load

SOURCE = Path(__file__).with_name("cpu_sparse_kernels.c")
OUT_TYPES = {torch.uint8: 0, torch.int8: 1, torch.int32: 2}


class Requant(ctypes.Structure):
    _fields_ = [("raw", ctypes.c_int32), ("out_type", ctypes.c_int32), ("bias", ctypes.c_void_p),
                ("m", ctypes.c_void_p), ("c", ctypes.c_void_p), ("per_column", ctypes.c_int32),
                ("pre", ctypes.c_int32), ("k", ctypes.c_int32), ("lo", ctypes.c_int32), ("hi", ctypes.c_int32),
                ("zp", ctypes.c_int32)]


@functools.cache
def library() -> ctypes.CDLL:
    lib = load(SOURCE, "cpu_sparse", "the sparse kernels")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.gs_spmm_f32.argtypes = [p, i64, i64, i64, p, p, p, ctypes.c_int, i64, p, p, i64, ctypes.c_int]
    lib.gs_spmm_s8.argtypes = [p, i64, i64, i64, p, p, p, i64, ctypes.POINTER(Requant), p, i64, ctypes.c_int]
    lib.gs_has_vnni.restype = ctypes.c_int
    lib.gs_limit_isa.argtypes = [i32]
    lib.gs_spmm_f32.restype = lib.gs_spmm_s8.restype = lib.gs_limit_isa.restype = None
    return lib


def available() -> bool:
    try:
        library()
    except (KernelBuildError, OSError):
        return False
    return True


def has_vnni() -> bool:
    return bool(library().gs_has_vnni())


def limit_isa(name: str) -> None:
    """``vnni`` (the default where the CPU has it) or ``portable`` (tests run both against the reference)."""
    library().gs_limit_isa({"portable": 0, "vnni": 1}[name])


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def spmm_f32(x: torch.Tensor, row_ptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n: int,
             bias: torch.Tensor | None, block: bool, threads: int | None = None) -> torch.Tensor:
    """x [..., K] float32 @ Wᵀ (+ bias) with W [n, K] in CSR (block=False) or 1x4 blocks (block=True)."""
    a = _rows(x)
    m, k = a.shape
    y = torch.empty(m, n, dtype=torch.float32)
    if m and n:
        library().gs_spmm_f32(_ptr(a), a.stride(0), m, k, _ptr(row_ptr), _ptr(col), _ptr(val), int(block), n,
                              _ptr(bias), _ptr(y), n, threads or torch.get_num_threads())
    return y.reshape(*x.shape[:-1], n)


def spmm_s8(x: torch.Tensor, row_ptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n: int,
            bias: torch.Tensor | None, *, requant: dict | None = None, out_dtype: torch.dtype = torch.int32,
            threads: int | None = None) -> torch.Tensor:
    """u8 x [..., K] times s8 W [n, K] in 1x4 blocks (val: 4 int8 per block packed as int32), int32
    accumulation plus ``bias`` (int32, with the activation zero point already folded in); with
    ``requant`` = {m, c, pre, k, lo, hi, zp} the ``int.requant`` epilogue, else raw int32."""
    if x.dtype != torch.uint8:
        raise TypeError(f"spmm_s8 takes u8 activations, got {x.dtype}")
    a = _rows(x)
    m, k = a.shape
    rq = requant or {}
    mm = rq.get("m", torch.ones(1, dtype=torch.int32)).to(torch.int32).reshape(-1).contiguous()
    cc = rq.get("c", torch.zeros(1, dtype=torch.int32)).to(torch.int32).reshape(-1).contiguous()
    if mm.numel() != cc.numel() or mm.numel() not in (1, n):
        raise ValueError(f"requant m and c must be per column ({n}) or scalar, got {mm.numel()} and {cc.numel()}")
    out = out_dtype if requant else torch.int32
    e = Requant(0 if requant else 1, OUT_TYPES[out], _ptr(bias), _ptr(mm), _ptr(cc), int(mm.numel() == n and n > 1),
                rq.get("pre", 0), rq.get("k", 0), rq.get("lo", -2 ** 31), rq.get("hi", 2 ** 31 - 1), rq.get("zp", 0))
    y = torch.empty(m, n, dtype=out)
    if m and n:
        library().gs_spmm_s8(_ptr(a), a.stride(0), m, k, _ptr(row_ptr), _ptr(col), _ptr(val), n, ctypes.byref(e),
                             _ptr(y), n, threads or torch.get_num_threads())
    return y.reshape(*x.shape[:-1], n)
