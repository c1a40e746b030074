"""Translate torch's symbolic sizes (SymInt, ShapeEnv sympy) into the IR's named sympy dims."""
from __future__ import annotations

import sympy
import torch

from graphopt.ir.types import canonical_dim, symbol

_TORCH_FUNCS = {
    "FloorDiv": lambda a, b: sympy.floor(a / b),
    "CeilDiv": lambda a, b: sympy.ceiling(a / b),
    "CleanDiv": lambda a, b: a / b,
    "IntTrueDiv": lambda a, b: a / b,
    "Mod": sympy.Mod,
    "PythonMod": sympy.Mod,
    "Max": sympy.Max,
    "Min": sympy.Min,
}


class SymbolTable:
    """Maps torch's ShapeEnv symbols (s0, s77) to the user's dim names (batch)."""

    def __init__(self):
        self.names: dict[sympy.Symbol, sympy.Symbol] = {}

    def bind(self, torch_symbol: sympy.Symbol, name: str) -> None:
        self.names.setdefault(torch_symbol, symbol(name))

    def convert(self, value):
        """int, SymInt or torch sympy expr -> int or IR sympy expr."""
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, torch.SymInt):
            hint = value.node.maybe_as_int() if hasattr(value.node, "maybe_as_int") else None
            if hint is not None:
                return hint
            value = value.node.expr
        if isinstance(value, sympy.Expr):
            return canonical_dim(self._rewrite(value).xreplace(self.names))
        raise TypeError(f"not a size: {value!r}")

    def _rewrite(self, expr: sympy.Expr) -> sympy.Expr:
        if not expr.args:
            if isinstance(expr, sympy.Symbol) and expr not in self.names:
                self.bind(expr, str(expr))
            return expr
        args = [self._rewrite(a) for a in expr.args]
        fn = _TORCH_FUNCS.get(type(expr).__name__)
        if fn is not None:
            return fn(*args)
        return expr.func(*args)
