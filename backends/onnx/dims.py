"""Symbolic dims as ONNX tensors: a literal where static, else computed from the graph inputs'
shapes at run time (``Shape`` / ``Gather`` / ``Mul`` ...) through the walk every emitter shares
(``ir/dim_lowering.py``). A reshape to ``[batch*197, 384]`` never gets here: its lowering writes
``Reshape(x, [-1, 384])``; these are for the dims that cannot be written that way.
"""
from __future__ import annotations

from typing import Sequence

import sympy
import torch

from graphopt.backends import LoweringError
from graphopt.ir.dim_lowering import lower_dim
from graphopt.ir.onnx_common import onnx_dtype


class OnnxDims:
    """The ``lower_dim`` algebra of ONNX: every value is the name of a 1-D int64 tensor of one element."""

    def __init__(self, em):
        self.em = em

    def const(self, value: int) -> str:
        return self.em.literal([value])

    def symbol(self, symbol: sympy.Symbol) -> str | None:
        em = self.em
        if symbol not in em.sources:
            return None
        name, axis = em.sources[symbol]
        if em.opset >= 15:
            return em.one("Shape", [name], em.fresh(f"{symbol}_dim"), start=axis, end=axis + 1)
        shape = em.one("Shape", [name])
        return em.one("Gather", [shape, em.literal([axis])], em.fresh(f"{symbol}_dim"), axis=0)

    def add(self, a: str, b: str) -> str:
        return self.em.one("Add", [a, b])

    def mul(self, a: str, b: str) -> str:
        return self.em.one("Mul", [a, b])

    def floordiv(self, a: str, b: str) -> str:
        return self.em.one("Div", [a, b])  # int64 Div truncates: the floor, on sizes

    def max(self, a: str, b: str) -> str:
        return self.em.one("Max", [a, b])

    def min(self, a: str, b: str) -> str:
        return self.em.one("Min", [a, b])


def dim1(em, expr) -> str:
    """A 1-D int64 tensor [expr] (each sub-expression computed once per graph)."""
    return lower_dim(expr, OnnxDims(em), where=em.where(), memo=em.dim_memo, error=LoweringError)


def shape_tensor(em, shape: Sequence) -> str:
    """A 1-D int64 tensor holding ``shape``: one literal when static, else runs of literals and
    computed dims concatenated."""
    shape = list(shape)
    if all(isinstance(d, int) for d in shape):
        return em.literal(shape, shape=[len(shape)])
    pieces, run = [], []
    for d in shape:
        if isinstance(d, int):
            run.append(d)
            continue
        if run:
            pieces.append(em.literal(run))
            run = []
        pieces.append(dim1(em, d))
    if run:
        pieces.append(em.literal(run))
    return pieces[0] if len(pieces) == 1 else em.one("Concat", pieces, axis=0)


def scalar(em, expr, dtype: torch.dtype = torch.int64) -> str:
    """A 0-D tensor holding a (possibly symbolic) dim."""
    if isinstance(expr, int) or (isinstance(expr, sympy.Expr) and expr.is_Integer):
        return em.literal(int(expr), dtype)
    result = em.one("Squeeze", [dim1(em, expr), em.literal([0])])
    return result if dtype == torch.int64 else em.one("Cast", [result], to=onnx_dtype(dtype))
