"""One lowering of symbolic dims to run-time arithmetic, shared by every emitter that needs sizes.

A dim such as ``batch*197`` or ``ceiling(n/2)`` (sympy) is walked once, here; the emitter supplies
an algebra saying what a constant, an input size and each arithmetic step become in its target
(an fx node calling ``operator.mul``, an ONNX ``Mul`` node, ...):

    class Algebra(Protocol):
        def const(self, value: int): ...
        def symbol(self, symbol: sympy.Symbol): ...   # None: no graph input axis has that size
        def add(self, a, b): ...
        def mul(self, a, b): ...
        def floordiv(self, a, b): ...               # operands are non-negative sizes
        def max(self, a, b): ...
        def min(self, a, b): ...

Forms walked: integers, symbols, sums, products (a rational coefficient or a negative integer power
is a division: ``n/2`` -> ``floordiv(n, 2)``), positive integer powers, ``floor`` / ``ceiling`` of
a fraction and ``Max`` / ``Min``. Arguments are visited in sympy's canonical order, so the same dim
always lowers to the same steps; ``memo`` (expression -> result) lets an emitter reuse a
sub-expression it has already computed.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Protocol

import sympy

from graphopt.ir.graph import GraphError


class DimLoweringError(GraphError):
    """A dim that cannot be computed at run time."""


class Algebra(Protocol):
    def const(self, value: int) -> Any: ...
    def symbol(self, symbol: sympy.Symbol) -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def floordiv(self, a: Any, b: Any) -> Any: ...
    def max(self, a: Any, b: Any) -> Any: ...
    def min(self, a: Any, b: Any) -> Any: ...


def lower_dim(expr, algebra: Algebra, *, where: str = "graph", memo: dict | None = None,
              error: type[Exception] = DimLoweringError):
    """``expr`` (an int or a sympy expression) in ``algebra``; ``where`` names the node asking, for
    errors (raised as ``error``)."""
    memo = {} if memo is None else memo

    def walk(e):
        if isinstance(e, numbers.Integral) or (isinstance(e, sympy.Expr) and e.is_Integer):
            return algebra.const(int(e))
        if e in memo:
            return memo[e]
        memo[e] = result = step(e)
        return result

    def fold(op, items):
        result = items[0]
        for item in items[1:]:
            result = op(result, item)
        return result

    def step(e):
        if isinstance(e, sympy.Symbol):
            result = algebra.symbol(e)
            if result is None:
                raise error(f"dim {expr} (node {where}) cannot be computed at run time: dim symbol {e} is not the "
                            "size of any graph input axis")
            return result
        if isinstance(e, sympy.Add):
            return fold(algebra.add, [walk(a) for a in _ordered_args(e)])
        if isinstance(e, sympy.Mul):
            nums, dens = [], []
            for a in _ordered_args(e):
                if isinstance(a, sympy.Rational) and not a.is_Integer:
                    nums.append(algebra.const(int(a.p)))
                    dens.append(int(a.q))
                elif isinstance(a, sympy.Pow) and a.exp.is_Integer and a.exp < 0:
                    dens.append(a.base ** -a.exp)
                else:
                    nums.append(walk(a))
            result = fold(algebra.mul, nums)
            if not dens:
                return result
            if all(isinstance(d, int) for d in dens):
                return algebra.floordiv(result, algebra.const(math.prod(dens)))
            return algebra.floordiv(result, walk(sympy.Mul(*dens)))
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp > 0:
            return fold(algebra.mul, [walk(e.base)] * int(e.exp))
        if isinstance(e, sympy.floor):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            return walk(num) if den == 1 else algebra.floordiv(walk(num), walk(den))
        if isinstance(e, sympy.ceiling):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            return algebra.floordiv(walk(num + den - 1), walk(den))
        if isinstance(e, (sympy.Max, sympy.Min)):
            return fold(algebra.max if isinstance(e, sympy.Max) else algebra.min, [walk(a) for a in _ordered_args(e)])
        raise error(f"cannot compute dim {expr} at run time (node {where}): {type(e).__name__} expressions such as "
                    f"{e} are not lowered")

    return walk(expr)


def _ordered_args(expr):
    return sorted(expr.args, key=sympy.default_sort_key)
