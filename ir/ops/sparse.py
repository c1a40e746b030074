"""The sparse-weight linear op: ``sparse_linear(x, row_ptr, col, values, bias?)``.

    y = x @ Wᵀ + bias      W [out_features, in_features] stored sparse as constants

Formats (``format`` attribute):
  * ``csr``       row_ptr [out + 1] int32, col [nnz] int32 (the k of each value), values [nnz]
  * ``block1x4``  blocks of 4 consecutive k in one row of W (the int8 VNNI-friendly shape): row_ptr
                  [out + 1] over blocks, col [blocks] = k / 4, values [blocks, 4]

The reference densifies W and calls ``F.linear`` (so it is exactly the dense layer); the ``torch``
backend runs the C SpMM kernel on CPU tensors (``backends/sparse_kernels.py``) and the Triton kernel
on CUDA tensors; the ONNX lowering writes the dense MatMul (ONNX Runtime densifies sparse
initialisers anyway). ``to_csr`` / ``to_block1x4`` / ``densify`` convert between the layouts.
"""
from __future__ import annotations

import sympy
import torch
import torch.nn.functional as F

from graphopt.ir.cost import register_cost
from graphopt.ir.opdef import Attr, OpError, register_op
from graphopt.ir.registry import Registry
from graphopt.ir.ops.rules import result_dtype
from graphopt.ir.types import TensorType, dims_equal

OP = "sparse_linear"
FORMATS = ("csr", "block1x4")

# target -> timer(weight [N, K] pruned float32, format, rows, threads) -> (dense ms, sparse ms): the
# micro-benchmark ``sparsify`` calibrates its substitution decisions with. Backends register theirs
# (``backends/sparse_kernels.py`` for ``torch``); ``timer.machine`` names what it measured on.
SPMM_TIMERS: Registry = Registry("SpMM timer", group="graphopt.kernels")


def register_spmm_timer(target: str, *, replace: bool = False):
    return SPMM_TIMERS.decorator(target, replace=replace)


def to_csr(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense [N, K] -> (row_ptr int32 [N + 1], col int32 [nnz], values [nnz]) of its nonzeros."""
    nz = w != 0
    counts = nz.sum(1)
    row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(counts, 0)
    rows, cols = nz.nonzero(as_tuple=True)
    return row_ptr, cols.to(torch.int32), w[rows, cols].contiguous()


def to_block1x4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense [N, K] -> (row_ptr [N + 1], col = k / 4 [blocks], values [blocks, 4]) of every block of 4
    consecutive k holding a nonzero (K is padded with zeros to a multiple of 4)."""
    n, k = w.shape
    pad = (-k) % 4
    wp = F.pad(w, (0, pad)) if pad else w
    blocks = wp.reshape(n, -1, 4)
    nz = (blocks != 0).any(-1)
    row_ptr = torch.zeros(n + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(nz.sum(1), 0)
    rows, cols = nz.nonzero(as_tuple=True)
    return row_ptr, cols.to(torch.int32), blocks[rows, cols].contiguous()


def densify(fmt: str, row_ptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out_features: int,
            in_features: int) -> torch.Tensor:
    """The dense [out_features, in_features] matrix of a stored sparse one."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(out_features), counts)
    if fmt == "csr":
        w = torch.zeros(out_features, in_features, dtype=values.dtype, device=values.device)
        w[rows, col.long()] = values
        return w
    k4 = (in_features + 3) // 4
    w = torch.zeros(out_features, k4, 4, dtype=values.dtype, device=values.device)
    w[rows, col.long()] = values
    return w.reshape(out_features, k4 * 4)[:, :in_features]


def _type(x, row_ptr, col, values, bias=None, *, format, out_features, in_features):
    if format not in FORMATS:
        raise OpError(f"{OP}: format {format!r} is not one of {FORMATS}")
    if x.rank < 1 or not dims_equal(x.shape[-1], in_features):
        raise OpError(f"{OP}: input {x} does not fit in_features={in_features}")
    if row_ptr.rank != 1 or row_ptr.dtype != torch.int32 or not dims_equal(row_ptr.shape[0], out_features + 1):
        raise OpError(f"{OP}: row_ptr must be int32 [out_features + 1 = {out_features + 1}], got {row_ptr}")
    if col.rank != 1 or col.dtype != torch.int32:
        raise OpError(f"{OP}: col must be int32 1-D, got {col}")
    want = 1 if format == "csr" else 2
    if values.rank != want or not dims_equal(values.shape[0], col.shape[0]) or \
            (format == "block1x4" and not dims_equal(values.shape[1], 4)):
        raise OpError(f"{OP}: values {values} do not fit col {col} in format {format}")
    if bias is not None and (bias.rank != 1 or not dims_equal(bias.shape[0], out_features)):
        raise OpError(f"{OP}: bias {bias} does not fit out_features={out_features}")
    return TensorType(result_dtype(x, values), x.shape[:-1] + (out_features,))


@register_op(OP, inputs=["x", "row_ptr", "col", "values", "bias?"],
             attrs={"format": Attr("str", "csr", f"one of {', '.join(FORMATS)}"),
                    "out_features": Attr("int"), "in_features": Attr("int")},
             infer=_type, tags=["gemm", "sparse"])
def sparse_linear(x, row_ptr, col, values, bias=None, *, format, out_features, in_features):
    """y = x @ Wᵀ + bias with W stored sparse (reference: densify, then the dense linear)."""
    return F.linear(x, densify(format, row_ptr, col, values, out_features, in_features).to(x.dtype), bias)


@register_cost(OP)
def _cost(node):
    x, _, col, values = (v.type for v in node.inputs[:4])
    rows = sympy.sympify(x.numel()) / sympy.sympify(x.shape[-1])
    nnz = sympy.sympify(values.numel())
    bias = rows * node.attrs["out_features"] if len(node.inputs) > 4 and node.inputs[4] is not None else 0
    return 2 * rows * nnz + bias


__all__ = ["FORMATS", "OP", "SPMM_TIMERS", "densify", "register_spmm_timer", "sparse_linear", "to_block1x4", "to_csr"]
