"""``cpu_integer``: int8 GEMMs whose weight is mostly zero 1x4 blocks run on the sparse VNNI kernel.

    int.requant(int.linear(x, w[, b]), m, c)  ->  cpu.int_spmm(kind=requant)     (m, c per column)
    int.linear(x, w[, b])                     ->  cpu.int_spmm(kind=raw)

The weight (constant int8, e.g. ``sparsify:pattern=block1x4`` before ``integer_only``) is stored as
1x4 blocks along K (``gs_spmm_s8`` in ``cpu_sparse_kernels.c``: one vpdpbusd per block and 16 rows);
the requant epilogue computes ``int.requant``'s integers exactly (16 lanes per tile column). Where the
int8 SpMM beats the dense GEMM depends on K, the output width and the machine: against a VNNI dense GEMM
from 80% zero blocks at K=1536; against the AMX one (Xeon with amx_int8, 1 thread, 1576 rows: 0.7-0.8 ms
at 1576x384x1536 and back) never, even at 95% (2.3 / 1.3 ms). So the rule decides per layer by measurement,
like ``sparsify``'s fp32 substitution (``ir/sparse_decision.py``): ``time_int8`` times both kernels
with the requant epilogue at the layer's shape (rows x K -> N, torch's thread count) and block sparsity, cached per shape
(``~/.cache/graphopt/sparse_timings.json``); the layer goes sparse only when faster by ``MARGIN``, and
the report's reason for a layer left dense gives both times. Weights with under ``MIN_MEASURED`` zero
blocks are not measured (quantised dense weights: the index per block cannot pay there). These rules
have a higher priority than the dense ones, so they are tried first.
"""
from __future__ import annotations

import math

import torch

from graphopt.backends import cpu_integer_library as dense_lib
from graphopt.backends import cpu_sparse_library as sparse
from graphopt.backends.kernels import register_fusion
from graphopt.ir.opdef import Attr, OpError, register_op
from graphopt.ir.ops.integer import INT_DTYPES
from graphopt.ir.ops.sparse import to_block1x4
from graphopt.ir.pattern import either
from graphopt.ir.rewrite import Rule
from graphopt.ir.types import TensorType
from graphopt.ir.sparse_decision import TimingSource, decide, default_cache
from graphopt.timing import interleaved

TARGET = "cpu_integer"
MIN_MEASURED = 0.5     # fewer zero 1x4 blocks than this: dense without measuring
MARGIN = 0.1           # the SpMM must beat the dense GEMM by this fraction of its time
DEFAULT_ROWS = 256     # rows the decision is measured at when the input's leading dims are symbolic


def _spmm_type(x, row_ptr, col, val, bias, m=None, c=None, *, n, flip, kind, out, pre, k, lo, hi, zp, threads):
    if x.dtype not in (torch.uint8, torch.int8) or val.dtype != torch.int32:
        raise OpError(f"cpu.int_spmm: expects 8-bit activations and blocks packed as int32, got {x}, {val}")
    return TensorType(INT_DTYPES[out], x.shape[:-1] + (n,))


@register_op("cpu.int_spmm", inputs=["x", "row_ptr", "col", "val", "bias", "m?", "c?"],
             attrs={"n": Attr("int"), "flip": Attr("bool", False), "kind": Attr("str", "raw"), "out": Attr("str", "i32"),
                    "pre": Attr("int", 0), "k": Attr("int", 0), "lo": Attr("int", 0), "hi": Attr("int", 0),
                    "zp": Attr("int", 0), "threads": Attr("int", 1)},
             infer=_spmm_type, tags=["gemm", "integer", "sparse"])
def int_spmm(x, row_ptr, col, val, bias, m=None, c=None, *, n, flip, kind, out, pre, k, lo, hi, zp, threads):
    """epilogue(x as u8 @ Wᵀ + bias) with W in int8 1x4 blocks (4 int8 per int32 of ``val``)."""
    a = torch.bitwise_xor(x.view(torch.uint8), 0x80) if flip else x
    rq = {"m": m, "c": c, "pre": pre, "k": k, "lo": lo, "hi": hi, "zp": zp} if kind == "requant" else None
    return sparse.spmm_s8(a, row_ptr, col, val, n, bias, requant=rq, out_dtype=INT_DTYPES[out], threads=threads)


def _block_sparsity(w: torch.Tensor) -> float:
    n, k = w.shape
    blocks = torch.nn.functional.pad(w, (0, (-k) % 4)).reshape(n, -1, 4)
    return 1.0 - float((blocks != 0).any(-1).float().mean())


def _column_vector(v, n: int) -> torch.Tensor | None:
    if v is None or not v.is_constant:
        return None
    t = v.const
    if t.numel() == 1:
        return t.reshape(1).to(torch.int32).expand(n).contiguous()
    return t.reshape(n).to(torch.int32).contiguous() if t.numel() == n and t.shape[-1] == n else None


def time_int8(weight: torch.Tensor, fmt: str, rows: int, threads: int, repeats: int = 5) -> tuple[float, float]:
    """The dense int8 GEMM against the 1x4-block SpMM for this weight's zero pattern, both with a per-column
    requant epilogue to u8, at ``rows`` random u8 rows: median ms of ``repeats`` interleaved rounds."""
    if fmt != "block1x4":
        raise ValueError(f"cpu_integer times int8 SpMM in 1x4 blocks only, not {fmt!r}")
    n, k = weight.shape
    w = torch.nn.functional.pad(weight.ne(0).to(torch.int8) * 3, (0, (-k) % 4))   # the same zero pattern, int8
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (rows, w.shape[1]), generator=g, dtype=torch.uint8)
    bias, c = torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
    m = torch.full((n,), 300, dtype=torch.int32)
    rq = {"pre": 0, "k": 16, "lo": 0, "hi": 255, "zp": 0}
    packed, _ = dense_lib.pack_b(w)
    epi = dense_lib.epilogue("requant", torch.uint8, bias, m=m, c=c, **rq)
    y = torch.empty(rows, n, dtype=torch.uint8)
    row_ptr, col, val = to_block1x4(w)
    val = val.contiguous().view(torch.int32).reshape(-1)
    t = interleaved({"dense": lambda: dense_lib.gemm(x, packed, n, epi, y, threads),
                     "sparse": lambda: sparse.spmm_s8(x, row_ptr, col, val, n, bias, requant=dict(rq, m=m, c=c),
                                                      out_dtype=torch.uint8, threads=threads)},
                    runs=repeats, warmup=1)
    return 1e3 * t["dense"].median, 1e3 * t["sparse"].median


time_int8.machine = "int8 1x4 SpMM vs dense int8 GEMM (" + \
    ("vnni" if sparse.available() and sparse.has_vnni() else "portable") + ")"


def _rows(x) -> int:
    lead = x.type.shape[:-1]
    return math.prod(lead) if all(isinstance(d, int) for d in lead) else DEFAULT_ROWS


def _check(ctx, x, w, b=None, m=None, c=None):
    linear = next(node for node in ctx.nodes if node.op == "int.linear")
    if not w.is_constant or w.type.rank != 2 or (b is not None and not b.is_constant):
        return ctx.fail(f"{linear.label()}: the weight and bias must be constants")
    n = w.type.shape[0]
    if m is not None and (_column_vector(m, n) is None or _column_vector(c, n) is None):
        return ctx.fail(f"{linear.label()}: the requant constants are not per output column")
    s = _block_sparsity(w.const)
    if s < MIN_MEASURED:
        return ctx.fail(f"{linear.label()}: {s:.0%} of its 1x4 weight blocks are zero (< {MIN_MEASURED:.0%}, not "
                        "measured): the dense GEMM")
    d = _decision(linear, x, w, s)
    linear.meta["sparse_decision"] = d.line()     # the kernel report shows it whichever rule fires
    return True if d.sparse else ctx.fail(d.line())


def _decision(linear, x, w, block_sparsity: float):
    """The measured (or cached) decision for this layer; its line goes to the report either way."""
    threads = torch.get_num_threads()
    source = TimingSource(TARGET, threads, None, default_cache(), measure=True, timer=time_int8)
    rows = _rows(x)
    dense_ms, sparse_ms, where = source.times(linear.label(), w.const, "block1x4", rows)
    source.save()
    d = decide(linear.label(), tuple(w.type.shape), rows, block_sparsity, "int8 block1x4", dense_ms, sparse_ms, MARGIN)
    d.why += f"; times {where}, {threads} threads"
    return d


def _rewrite(op, nodes, x, w, b=None, m=None, c=None):
    linear = next(node for node in nodes if node.op == "int.linear")
    weight = w.const
    n = weight.shape[0]
    flip = x.type.dtype == torch.int8
    a_zp = linear.attrs["x_zp"] + (128 if flip else 0)
    bias = (b.const.to(torch.int64) if b is not None else 0) - a_zp * weight.to(torch.int64).sum(1)
    bias = (((bias + 2 ** 31) % 2 ** 32) - 2 ** 31).to(torch.int32).expand(n).contiguous()
    row_ptr, col, val = to_block1x4(weight)
    attrs = {"n": n, "flip": flip, "kind": "raw", "out": "i32"}
    extra = []
    if m is not None:
        rq = next(node for node in nodes if node.op == "int.requant").attrs
        attrs.update(kind="requant", out=rq["dtype"], pre=rq["pre"], k=rq["k"], lo=rq["lo"], hi=rq["hi"],
                     zp=rq["zero_point"])
        extra = [op.add_constant(_column_vector(m, n), "m"), op.add_constant(_column_vector(c, n), "c")]
    out = op("cpu.int_spmm", x, op.add_constant(row_ptr, "row_ptr"), op.add_constant(col, "col"),
             op.add_constant(val.contiguous().view(torch.int32).reshape(-1), "val"), op.add_constant(bias, "bias"),
             *extra, **attrs)
    out.producer.meta["sparse_decision"] = linear.meta["sparse_decision"]
    return out


def _linear(op, x, w, b):
    return either(op("int.linear", x, w), op("int.linear", x, w, b))


def _requant(op, x, w, b, m, c):
    return op("int.requant", _linear(op, x, w, b), m, c)


def _raw(op, x, w, b):
    return _linear(op, x, w, b)


register_fusion(TARGET, Rule("sparse_gemm_requant", _requant, _rewrite, _check), priority=1)
register_fusion(TARGET, Rule("sparse_gemm_raw", _raw, _rewrite, _check), priority=1)
