"""Data-movement ops: reshape, permute, expand, cat, slice, select, gather, and the
tensor factories (arange, full). Shapes may be symbolic."""
from __future__ import annotations

import sympy
import torch

from graphopt.ir.opdef import Attr, OpError, register_op
from graphopt.ir.ops.rules import ceil_div
from graphopt.ir.types import TensorType, canonical_dim, dims_equal, normalize_axis

BIG = 2 ** 62


def _reshape_type(x: TensorType, *, shape):
    shape = list(shape)
    if shape.count(-1) > 1:
        raise OpError(f"reshape: at most one -1 in {shape}")
    known = sympy.Mul(*[sympy.sympify(d) for d in shape if not (isinstance(d, int) and d == -1)])
    if -1 in shape:
        shape[shape.index(-1)] = canonical_dim(sympy.sympify(x.numel()) / known)
    elif not dims_equal(x.numel(), canonical_dim(known)):
        raise OpError(f"reshape: {x} has {x.numel()} elements, target shape {list(map(str, shape))} has {known}")
    return x.with_shape(shape)


@register_op("reshape", inputs=["x"], attrs={"shape": Attr("shape")}, infer=_reshape_type, tags=["layout"])
def reshape(x, *, shape):
    return torch.reshape(x, shape)


def _permute_type(x, *, dims):
    if sorted(normalize_axis(d, x.rank) for d in dims) != list(range(x.rank)):
        raise OpError(f"permute: {list(dims)} is not a permutation of {x.rank} axes")
    return x.with_shape([x.shape[d] for d in dims])


@register_op("permute", inputs=["x"], attrs={"dims": Attr("ints")}, infer=_permute_type, tags=["layout"])
def permute(x, *, dims):
    return torch.permute(x, dims)


def _expand_type(x, *, shape):
    lead = len(shape) - x.rank
    if lead < 0:
        raise OpError(f"expand: target {list(map(str, shape))} has fewer axes than {x}")
    out = []
    for i, d in enumerate(shape):
        src = x.shape[i - lead] if i >= lead else None
        if isinstance(d, int) and d == -1:
            if src is None:
                raise OpError("expand: -1 is not allowed for a new leading axis")
            d = src
        elif src is not None and src != 1 and not dims_equal(src, d):
            raise OpError(f"expand: cannot expand axis {i} of {x} to {d}")
        out.append(d)
    return x.with_shape(out)


@register_op("expand", inputs=["x"], attrs={"shape": Attr("shape")}, infer=_expand_type, tags=["layout"])
def expand(x, *, shape):
    return x.expand(shape)


def _cat_type(*xs, dim):
    first = xs[0]
    axis = normalize_axis(dim, first.rank)
    for x in xs[1:]:
        if x.rank != first.rank or any(i != axis and not dims_equal(a, b) for i, (a, b) in enumerate(zip(x.shape, first.shape))):
            raise OpError(f"cat: {x} does not fit {first} along axis {axis}")
    total = canonical_dim(sum(sympy.sympify(x.shape[axis]) for x in xs))
    from graphopt.ir.ops.rules import result_dtype
    return TensorType(result_dtype(*xs), tuple(total if i == axis else d for i, d in enumerate(first.shape)))


@register_op("cat", inputs=["*xs"], attrs={"dim": Attr("int")}, infer=_cat_type, tags=["layout"])
def cat(*xs, dim):
    return torch.cat(xs, dim)


def slice_length(size, start, end, step):
    """Length of x[start:end:step] on an axis of ``size`` (symbolic when size is)."""
    if isinstance(start, int) and start < 0:
        start = size + start
    if isinstance(end, int) and (end >= BIG or (isinstance(size, int) and end > size)):
        end = size
    elif isinstance(end, int) and end < 0:
        end = size + end
    length = canonical_dim(sympy.sympify(end) - sympy.sympify(start))
    if isinstance(length, int):
        return max(0, -(-length // step))
    return ceil_div(length, step)


def _slice_type(x, *, dim, start, end, step):
    axis = normalize_axis(dim, x.rank)
    if step < 1:
        raise OpError(f"slice: step must be positive, got {step}")
    n = slice_length(x.shape[axis], start, end, step)
    return x.with_shape([n if i == axis else d for i, d in enumerate(x.shape)])


@register_op("slice", inputs=["x"], attrs={"dim": Attr("int"), "start": Attr("dim", 0), "end": Attr("dim", BIG),
                                           "step": Attr("int", 1)}, infer=_slice_type, tags=["layout"])
def slice_(x, *, dim, start, end, step):
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, end, step)
    return x[tuple(index)]


def _select_type(x, *, dim, index):
    axis = normalize_axis(dim, x.rank)
    return x.with_shape([d for i, d in enumerate(x.shape) if i != axis])


@register_op("select", inputs=["x"], attrs={"dim": Attr("int"), "index": Attr("dim")}, infer=_select_type, tags=["layout"])
def select(x, *, dim, index):
    return torch.select(x, dim, index)


def _gather_type(x, index, *, dim):
    if index.dtype not in (torch.int64, torch.int32) or index.rank != x.rank:
        raise OpError(f"gather: index {index} must be integer with the rank of {x}")
    return x.with_shape(index.shape)


@register_op("gather", inputs=["x", "index"], attrs={"dim": Attr("int")}, infer=_gather_type)
def gather(x, index, *, dim):
    return torch.gather(x, dim, index)


def _index_select_type(x, index, *, dim):
    axis = normalize_axis(dim, x.rank)
    if index.rank != 1:
        raise OpError(f"index_select: index must be 1-D, got {index}")
    return x.with_shape([index.shape[0] if i == axis else d for i, d in enumerate(x.shape)])


@register_op("index_select", inputs=["x", "index"], attrs={"dim": Attr("int")}, infer=_index_select_type)
def index_select(x, index, *, dim):
    return torch.index_select(x, dim, index)


@register_op("arange", inputs=[], attrs={"start": Attr("dim", 0), "end": Attr("dim"), "step": Attr("int", 1),
                                         "dtype": Attr("dtype", torch.int64)},
             infer=lambda *, start, end, step, dtype: TensorType(dtype, (slice_length(end, start, end, step),)))
def arange(*, start, end, step, dtype):
    return torch.arange(start, end, step, dtype=dtype)


@register_op("full", inputs=[], attrs={"shape": Attr("shape"), "value": Attr("scalar"), "dtype": Attr("dtype")},
             infer=lambda *, shape, value, dtype: TensorType(dtype, shape))
def full(*, shape, value, dtype):
    return torch.full(shape, value, dtype=dtype)
