"""Tensor types with symbolic shapes.

A dim is an ``int`` or a sympy expression over named symbols (``batch``, ``tokens``),
so a pass that changes the token count can say by how much before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Union

import sympy
import torch

Dim = Union[int, sympy.Expr]

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "bool",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def canonical_dim(dim) -> Dim:
    """An int when the dim is a known integer, else a simplified sympy expression."""
    if isinstance(dim, bool):
        raise TypeError(f"a dim cannot be a bool: {dim!r}")
    if isinstance(dim, int):
        return dim
    if isinstance(dim, str) and dim.isidentifier():
        return symbol(dim)
    expr = sympy.sympify(dim)
    if expr.is_Integer:
        return int(expr)
    loose = {s: symbol(s.name) for s in expr.free_symbols if not s.is_integer}
    return sympy.simplify(expr.xreplace(loose) if loose else expr)


def symbol(name: str) -> sympy.Symbol:
    """The IR's dim symbols are positive integers, so floor/ceil of them simplify."""
    return sympy.Symbol(name, integer=True, positive=True)


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def format_dim(dim: Dim) -> str:
    return str(dim).replace(" ", "")


def dim_symbols(dims: Iterable[Dim]) -> set[sympy.Symbol]:
    found: set[sympy.Symbol] = set()
    for dim in dims:
        if not isinstance(dim, int):
            found |= dim.free_symbols
    return found


def evaluate_dim(dim: Dim, bindings: dict[sympy.Symbol, int]) -> int:
    if isinstance(dim, int):
        return dim
    value = dim.subs(bindings)
    if not value.is_Integer:
        raise ValueError(f"dim {dim} does not evaluate to an integer with {bindings}")
    return int(value)


@dataclass(frozen=True)
class TensorType:
    dtype: torch.dtype
    shape: tuple[Dim, ...]

    def __post_init__(self):
        if self.dtype not in DTYPE_NAMES:
            raise TypeError(f"unsupported dtype {self.dtype}")
        object.__setattr__(self, "shape", tuple(canonical_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> Dim:
        return canonical_dim(sympy.Mul(*[sympy.sympify(d) for d in self.shape]))

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: torch.dtype) -> "TensorType":
        return TensorType(dtype, self.shape)

    def matches(self, other: "TensorType") -> bool:
        """Equal dtype and rank, and every dim provably equal."""
        return (self.dtype == other.dtype and self.rank == other.rank
                and all(dims_equal(a, b) for a, b in zip(self.shape, other.shape)))

    def __str__(self) -> str:
        return f"{DTYPE_NAMES[self.dtype]}[{','.join(format_dim(d) for d in self.shape)}]"

    @staticmethod
    def of(tensor: torch.Tensor) -> "TensorType":
        return TensorType(tensor.dtype, tuple(tensor.shape))

    @staticmethod
    def parse(text: str) -> "TensorType":
        name, _, rest = text.partition("[")
        dims = [d for d in rest.rstrip("]").split(",") if d]
        return TensorType(DTYPES_BY_NAME[name], tuple(int(d) if d.lstrip("-").isdigit() else d for d in dims))


def normalize_axis(axis: int, rank: int) -> int:
    if not -max(rank, 1) <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} is out of range for rank {rank}")
    return axis % max(rank, 1)
