"""``cpu_integer``: int8 GEMMs whose weight is mostly zero 1x4 blocks run on the sparse VNNI kernel.

    int.requant(int.linear(x, w[, b]), m, c)  ->  cpu.int_spmm(kind=requant)     (m, c per column)
    int.linear(x, w[, b])                     ->  cpu.int_spmm(kind=raw)

The weight (constant int8, e.g. ``sparsify:pattern=block1x4`` before ``integer_only``) is stored as
1x4 blocks along K (``gs_spmm_s8`` in ``cpu_sparse_kernels.c``: one vpdpbusd per block and 16 rows);
the requant epilogue computes ``int.requant``'s integers exactly. A weight with fewer than
``MIN_BLOCK_SPARSITY`` zero blocks, or a reduction shorter than ``MIN_K``, stays on the dense GEMM rules
(fixed thresholds from bench/sparse.py, not yet a per-shape measurement), and ``why_not`` says so. These rules
have a higher priority than the dense ones, so they are tried first.
"""
from __future__ import annotations

import torch

from graphopt.backends import cpu_sparse_library as sparse
from graphopt.backends.kernels import register_fusion
from graphopt.ir.opdef import Attr, OpError, register_op
from graphopt.ir.ops.integer import INT_DTYPES
from graphopt.ir.ops.sparse import to_block1x4
from graphopt.ir.pattern import either
from graphopt.ir.rewrite import Rule
from graphopt.ir.types import TensorType

TARGET = "cpu_integer"
# Intel reports int8 1x4 sparse GEMM gains from 70%; ours (bench/sparse.py, DeiT-S MLP shapes, 2 threads) beats the
# dense VNNI GEMM from 80% at K=1536 (1.4x at 90%, 1.7x at 95%) and never at K=384 (its scalar requant epilogue
# dominates when each output sums few blocks): the rule takes K >= MIN_K at >= MIN_BLOCK_SPARSITY only
MIN_BLOCK_SPARSITY = 0.9
MIN_K = 1024


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


def _check(ctx, x, w, b=None, m=None, c=None):
    linear = next(node for node in ctx.nodes if node.op == "int.linear")
    if not w.is_constant or w.type.rank != 2 or (b is not None and not b.is_constant):
        return ctx.fail(f"{linear.label()}: the weight and bias must be constants")
    if w.type.shape[1] < MIN_K:
        return ctx.fail(f"{linear.label()}: K = {w.type.shape[1]} < {MIN_K}: the dense VNNI GEMM is faster at this depth")
    s = _block_sparsity(w.const)
    if s < MIN_BLOCK_SPARSITY:
        return ctx.fail(f"{linear.label()}: {s:.0%} of its 1x4 weight blocks are zero (< {MIN_BLOCK_SPARSITY:.0%}): "
                        "the dense VNNI GEMM is faster")
    n = w.type.shape[0]
    if m is not None and (_column_vector(m, n) is None or _column_vector(c, n) is None):
        return ctx.fail(f"{linear.label()}: the requant constants are not per output column")
    return True


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
    return op("cpu.int_spmm", x, op.add_constant(row_ptr, "row_ptr"), op.add_constant(col, "col"),
              op.add_constant(val.contiguous().view(torch.int32).reshape(-1), "val"), op.add_constant(bias, "bias"),
              *extra, **attrs)


def _linear(op, x, w, b):
    return either(op("int.linear", x, w), op("int.linear", x, w, b))


def _requant(op, x, w, b, m, c):
    return op("int.requant", _linear(op, x, w, b), m, c)


def _raw(op, x, w, b):
    return _linear(op, x, w, b)


register_fusion(TARGET, Rule("sparse_gemm_requant", _requant, _rewrite, _check), priority=1)
register_fusion(TARGET, Rule("sparse_gemm_raw", _raw, _rewrite, _check), priority=1)
