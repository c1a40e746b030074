"""Builds and loads ``cpu_integer_kernels.c`` with the system C compiler (once per source, compiler and
CPU; cached under ``~/.cache/graphopt/cpu_integer``), and wraps its entry points for torch tensors."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from graphopt.backends.c_build import KernelBuildError, load  # (KernelBuildError: callers catch it here too)

SOURCE = Path(__file__).with_name("cpu_integer_kernels.c")
ABI = 5                      # go_abi() of the kernels these bindings call
OUT_TYPES = {torch.uint8: 0, torch.int8: 1, torch.int32: 2}
EPILOGUES = {"raw": 0, "requant": 1, "table": 2, "add": 3, "table_requant": 4, "add_requant": 5, "requant_requant": 6}


class Epilogue(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("out_type", ctypes.c_int32), ("bias", ctypes.c_void_p),
                ("pre", ctypes.c_int32), ("k", ctypes.c_int32), ("lo", ctypes.c_int32), ("hi", ctypes.c_int32),
                ("zp", ctypes.c_int32), ("m", ctypes.c_void_p), ("c", ctypes.c_void_p), ("table", ctypes.c_void_p),
                ("res", ctypes.c_void_p), ("ldr", ctypes.c_int64), ("pb", ctypes.c_int32), ("pad_", ctypes.c_int32),
                ("mb", ctypes.c_void_p), ("m2", ctypes.c_void_p), ("c2", ctypes.c_void_p), ("pre2", ctypes.c_int32),
                ("k2", ctypes.c_int32), ("lo2", ctypes.c_int32), ("hi2", ctypes.c_int32), ("zp2", ctypes.c_int32),
                ("pad2_", ctypes.c_int32), ("ks", ctypes.c_void_p), ("gelu_x", ctypes.c_int32),
                ("gelu_n", ctypes.c_int32), ("gelu_bits", ctypes.c_int32), ("gelu_in_bits", ctypes.c_int32)]


class Softmax(ctypes.Structure):
    _fields_ = [("pow2", ctypes.c_void_p), ("X", ctypes.c_int32), ("n", ctypes.c_int32), ("bits", ctypes.c_int32),
                ("pad_", ctypes.c_int32), ("mask", ctypes.c_void_p), ("m0", ctypes.c_int64), ("m1", ctypes.c_int64),
                ("mr", ctypes.c_int64), ("sizes", ctypes.c_void_p), ("s0", ctypes.c_int64), ("s1", ctypes.c_int64),
                ("sr", ctypes.c_int64), ("table", ctypes.c_void_p), ("tlen", ctypes.c_int32), ("pad2_", ctypes.c_int32),
                ("logits", ctypes.c_void_p)]


class Call(ctypes.Structure):
    """One recorded kernel call for go_run_calls: the function, up to CALL_ARGS integer-class arguments, and the
    status its int result must equal when check is 32 or 64."""
    CALL_ARGS = 32
    _fields_ = [("fn", ctypes.c_void_p), ("check", ctypes.c_int32), ("pad_", ctypes.c_int32),
                ("status", ctypes.c_int64), ("got", ctypes.c_int64), ("a", ctypes.c_uint64 * CALL_ARGS)]


def _rows_of(t: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """t broadcast to the 4-D ``shape`` (no copy unless its last axis is strided)."""
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)).expand(shape)
    return t if t.stride(-1) == 1 else t.contiguous()


def softmax(pow2: torch.Tensor, x_units: int, n_pow: int, bits: int, mask: torch.Tensor | None,
            shape: tuple[int, int, int, int], sizes: torch.Tensor | None = None,
            table: torch.Tensor | None = None, logits: Epilogue | None = None) -> Softmax:
    """Shiftmax parameters (int.shiftmax with X = x_units, n = n_pow; pow2 = shift_pow2(0 .. n X)) for rows
    of a [D0, D1, R, L] tensor; a bool mask broadcasts to that shape. With int32 ``sizes`` (broadcast to the
    shape) and a 1-D int32 ``table``, the logits get ``table[clamp(sizes, 0, len - 1)]`` added first, or with
    ``logits`` (an add_requant epilogue) become its requant(int.add(logits, that term))."""
    if mask is not None:
        mask = _rows_of(mask, shape).view(torch.uint8)
    m0, m1, mr = mask.stride()[:3] if mask is not None else (0, 0, 0)
    if sizes is not None:
        sizes, table = _rows_of(sizes, shape), table.contiguous()
    s0, s1, sr = sizes.stride()[:3] if sizes is not None else (0, 0, 0)
    sm = Softmax(_ptr(pow2), x_units, n_pow, bits, 0, _ptr(mask), m0, m1, mr, _ptr(sizes), s0, s1, sr, _ptr(table),
                 0 if table is None else table.shape[0], 0, None if logits is None else ctypes.addressof(logits))
    sm.tensors = (pow2, mask, sizes, table, logits)
    return sm


@functools.cache
def library() -> ctypes.CDLL:
    lib = load(SOURCE, "cpu_integer", "the cpu_integer kernels")
    abi = lib.go_abi() if hasattr(lib, "go_abi") else 1
    if abi != ABI:
        raise KernelBuildError(f"{SOURCE} has the kernels' calling convention {abi}, these bindings are for {ABI} "
                               "(a kernel source from before a go_* signature changed)")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.go_packed_size.restype = i64
    lib.go_packed_size.argtypes = [i64, i64]
    lib.go_pack_b.argtypes = [p, i64, i64, p, p]
    lib.go_gemm.argtypes = [p, i64, i64, i64, p, i64, ctypes.POINTER(Epilogue), p, i64, p, ctypes.c_int]
    lib.go_bmm.argtypes = [p, i64, i64, i64, p, i64, i64, i64, i64, i32, i64, i64, i64, i64, i64, i32,
                           ctypes.POINTER(Epilogue), ctypes.POINTER(Softmax), p, p, i64, i64, i64, i64, i64, i64,
                           ctypes.c_int]
    lib.go_shiftmax.argtypes = [p, i64, i64, i64, i64, ctypes.POINTER(Softmax), p, ctypes.c_int]
    lib.go_layernorm.argtypes = [p, i64, i64, i32, i32, i32, ctypes.POINTER(Epilogue), p, p, ctypes.c_int]
    lib.go_add.argtypes = [p, p, i64, i64, i64, ctypes.POINTER(Epilogue), p, p, ctypes.c_int]
    lib.go_requant.argtypes = [p, ctypes.c_int, i64, i64, ctypes.POINTER(Epilogue), p, p, ctypes.c_int]
    if hasattr(lib, "go_run_calls"):          # x86-64 Linux only: cpu_integer_replay batches its calls with it
        lib.go_run_calls.argtypes, lib.go_run_calls.restype = [ctypes.POINTER(Call), i64], i64
    lib.go_has_vnni.restype = lib.go_has_amx.restype = ctypes.c_int
    lib.go_limit_isa.argtypes = [ctypes.c_int]
    for void in (lib.go_pack_b, lib.go_gemm, lib.go_bmm, lib.go_shiftmax, lib.go_layernorm, lib.go_requant, lib.go_add,
                 lib.go_limit_isa):
        void.restype = None                   # not ctypes' default int: nothing to read back
    return lib


ISA_LEVELS = {"portable": 0, "vnni": 1, "amx": 2}


def available_isas() -> list[str]:
    lib = library()
    return ["portable"] + (["vnni"] if lib.go_has_vnni() else []) + (["amx"] if lib.go_has_amx() else [])


def limit_isa(name: str) -> None:
    """Use at most this GEMM instruction set (tests run every available one against the reference)."""
    library().go_limit_isa(ISA_LEVELS[name])


def gelu_division_free(epi: Epilogue) -> bool:
    """Whether GEMMs with this int.shiftgelu epilogue compute its sigmoid factor without an integer division here
    (the AVX-512 epilogue, after checking that way against the exact one for every input it can see)."""
    query = library().go_gelu_division_free     # bound here: bench/vnni_peak.py loads older sources of this ABI too
    query.argtypes, query.restype = [ctypes.POINTER(Epilogue)], ctypes.c_int
    return bool(query(ctypes.byref(epi)))


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def pack_b(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] int8 -> (packed panels, int32 column sums)."""
    b = b.contiguous()
    n, k = b.shape
    packed = torch.empty(library().go_packed_size(n, k), dtype=torch.int8)
    colsum = torch.empty(n, dtype=torch.int32)
    library().go_pack_b(_ptr(b), n, k, _ptr(packed), _ptr(colsum))
    return packed, colsum


def epilogue(kind: str, out_dtype: torch.dtype, bias: torch.Tensor | None, *, pre=0, k=0, lo=0, hi=0, zp=0, m=None,
             c=None, table=None, res=None, pb=0, mb=None, second: dict | None = None, ks=None,
             gelu: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Epilogue:
    """The C epilogue record (it holds on to the tensors it points into); ``second``: the per-column requant
    after the table of kind table_requant, as {m, c, pre, k, lo, hi, zp}; ``ks`` (GEMMs only): an int32 shift
    per column instead of ``k``; ``gelu``: int.shiftgelu's (X, n, bits, in_bits) when the table of kind
    table_requant is shiftgelu(y + zp), so the AVX-512 epilogue may compute it instead (X 0: it may not)."""
    s = second or {}
    epi = Epilogue(EPILOGUES[kind], OUT_TYPES[out_dtype], _ptr(bias), pre, k, lo, hi, zp, _ptr(m), _ptr(c),
                   _ptr(table), _ptr(res), 0 if res is None else res.stride(-2), pb, 0, _ptr(mb), _ptr(s.get("m")),
                   _ptr(s.get("c")), s.get("pre", 0), s.get("k", 0), s.get("lo", 0), s.get("hi", 0), s.get("zp", 0), 0,
                   _ptr(ks), *gelu)
    epi.tensors = (bias, m, c, table, res, mb, s.get("m"), s.get("c"), ks)
    return epi


def with_residual(epi: Epilogue, res: torch.Tensor) -> Epilogue:
    """A copy of ``epi`` whose residual operand (kind add) is ``res``, rows ``res.stride(-2)`` apart."""
    out = Epilogue.from_buffer_copy(epi)
    out.res, out.ldr = res.data_ptr(), res.stride(-2)
    out.tensors = epi.tensors + (res,)
    return out


def gemm(a: torch.Tensor, packed: torch.Tensor, n: int, epi: Epilogue, out: torch.Tensor, threads: int,
         live: torch.Tensor | None = None) -> None:
    """out[M, n] = epilogue(a[M, K] as u8 x packed B); a's rows contiguous with K % 4 == 0. With ``live`` (u8 [M],
    contiguous), only its nonzero rows are computed and the others are zero."""
    m, k = a.shape
    library().go_gemm(_ptr(a), a.stride(0), m, k, _ptr(packed), n, ctypes.byref(epi), _ptr(out), out.stride(-2),
                      _ptr(live), threads)


def bmm(a: torch.Tensor, b: torch.Tensor, a_zp: int, b_flip: bool, epi: Epilogue, out: torch.Tensor, threads: int,
        sm: Softmax | None = None, live: torch.Tensor | None = None) -> None:
    """out[i, j] = epilogue(a[i, j] @ b[i, j]) for 4-D a [B1, B2, M, K] (unit k stride) and b [B1, B2, K, N]
    (any strides); out [B1, B2, M, N] with unit n stride (a permuted view: written in place), contiguous with sm,
    where Shiftmax runs on the epilogue's int32 rows and out is u8. With ``live`` (u8 [B1, B2, M], any strides)
    only the rows it marks are computed, the others are zero."""
    b1, b2, m, k = a.shape
    if out.stride(-1) != 1 or (sm is not None and not out.is_contiguous()):
        raise ValueError(f"bmm: out needs unit stride along N (contiguous with Shiftmax), got strides {out.stride()}")
    strides = (0, 0, 0) if live is None else live.stride()
    library().go_bmm(_ptr(a), a.stride(0), a.stride(1), a.stride(2), _ptr(b), *b.stride(), int(b_flip), b1, b2, m, k,
                     b.shape[-1], a_zp, ctypes.byref(epi), None if sm is None else ctypes.byref(sm), _ptr(out),
                     _ptr(live), *strides, *out.stride()[:3], threads)


def shiftmax(x: torch.Tensor, sm: Softmax, out: torch.Tensor, threads: int) -> None:
    """Shiftmax over the rows of a contiguous 4-D x."""
    library().go_shiftmax(_ptr(x), *x.shape, ctypes.byref(sm), _ptr(out), threads)


def layernorm(x: torch.Tensor, sh: int, f: int, iters: int, rq: Epilogue | None, out: torch.Tensor, threads: int,
              live: torch.Tensor | None = None) -> None:
    """int.layernorm over the rows of a contiguous x (then rq); ``live`` (u8 per row): the rows computed, others 0."""
    rows, c = x.numel() // x.shape[-1], x.shape[-1]
    library().go_layernorm(_ptr(x), rows, c, sh, f, iters, None if rq is None else ctypes.byref(rq), _ptr(out),
                           _ptr(live), threads)


def requant(x: torch.Tensor, epi: Epilogue, out: torch.Tensor, threads: int, live: torch.Tensor | None = None) -> None:
    """int.requant of a contiguous x with per-column (last axis) m, c; ``live`` (u8 per row): the rows computed."""
    rows, c = x.numel() // x.shape[-1], x.shape[-1]
    library().go_requant(_ptr(x), OUT_TYPES[x.dtype], rows, c, ctypes.byref(epi), _ptr(out), _ptr(live), threads)


def add(a: torch.Tensor, b: torch.Tensor, epi: Epilogue, out: torch.Tensor, threads: int,
        live: torch.Tensor | None = None) -> None:
    """int.add of two contiguous int32 tensors, per-column constants in the epilogue; b holds a's rows or fewer
    (repeated over a's rows in order); ``live`` (u8 per row): the rows computed, the others 0."""
    rows, c = a.numel() // a.shape[-1], a.shape[-1]
    b_rows = b.numel() // c
    if b.shape[-1] != c or rows % max(b_rows, 1):
        raise ValueError(f"add: b {tuple(b.shape)} does not repeat evenly over a {tuple(a.shape)}")
    library().go_add(_ptr(a), _ptr(b), b_rows, rows, c, ctypes.byref(epi), _ptr(out), _ptr(live), threads)
