"""Type rules shared by the built-in ops (and useful to pass authors' ops)."""
from __future__ import annotations

import sympy
import torch

from graphopt.ir.opdef import OpError
from graphopt.ir.types import Dim, TensorType, canonical_dim, dims_equal, normalize_axis


def same_as_input(x: TensorType, *rest, **attrs) -> TensorType:
    return x


def result_dtype(*types: TensorType) -> torch.dtype:
    """torch's promotion rules, including that 0-d tensors rank below dimensioned ones."""
    current = torch.empty(() if types[0].rank == 0 else (1,), dtype=types[0].dtype, device="meta")
    for t in types[1:]:
        probe = torch.empty(() if t.rank == 0 else (1,), dtype=t.dtype, device="meta")
        dtype = torch.result_type(current, probe)
        current = torch.empty(() if current.dim() == 0 and probe.dim() == 0 else (1,), dtype=dtype, device="meta")
    return current.dtype


def broadcast_shapes(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for axis in range(rank):
        dim: Dim = 1
        for s in shapes:
            d = s[axis - rank + len(s)] if axis - rank + len(s) >= 0 else 1
            if d == 1:
                continue
            if dim == 1:
                dim = d
            elif not dims_equal(dim, d):
                raise OpError(f"shapes {[list(map(str, s)) for s in shapes]} do not broadcast at axis {axis}")
        out.append(dim)
    return tuple(out)


def broadcast(*types: TensorType | None, **attrs) -> TensorType:
    present = [t for t in types if t is not None]
    return TensorType(result_dtype(*present), broadcast_shapes(*(t.shape for t in present)))


def compare(a: TensorType, b: TensorType, **attrs) -> TensorType:
    return TensorType(torch.bool, broadcast_shapes(a.shape, b.shape))


def float_result(x: TensorType, *rest, **attrs) -> TensorType:
    """Unary float math: integer inputs promote to the default float dtype, as in torch."""
    return x if x.dtype.is_floating_point else x.with_dtype(torch.get_default_dtype())


def reduce_shape(x: TensorType, dims: tuple[int, ...], keepdim: bool) -> tuple[Dim, ...]:
    axes = {normalize_axis(d, x.rank) for d in dims} if dims else set(range(x.rank))
    if keepdim:
        return tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    return tuple(d for i, d in enumerate(x.shape) if i not in axes)


def ceil_div(a: Dim, b: int) -> Dim:
    if isinstance(a, int):
        return -(-a // b)
    return canonical_dim(sympy.ceiling(sympy.sympify(a) / b))
