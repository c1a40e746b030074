"""ONNX -> IR handlers for data movement, indexing and factories (``Reshape``, ``Slice``, ``Gather``,
``Range``, ``Constant``, ...). Target shapes, starts and indices are read from the symbolically
evaluated shape subgraph (``cv.known_ints``), so a reshape to ``[batch, 197, 6, 64]`` stays symbolic."""
from __future__ import annotations

import numpy as np
import sympy
import torch

from graphopt.frontends import Unsupported
from graphopt.frontends.onnx.handlers import attributes, handles, input_name
from graphopt.ir.onnx_common import tensor_from_proto
from graphopt.ir.ops.rules import broadcast_shapes
from graphopt.ir.ops.shape import BIG
from graphopt.ir.types import canonical_dim, dims_equal, normalize_axis


def _dim(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (int, sympy.Expr)) and not isinstance(value, bool):
        return canonical_dim(value)
    raise Unsupported(f"{value!r} is not a dim")


def _shape_or_raise(cv, name: str, what: str) -> list:
    values = cv.known_ints(name)
    if values is None:
        raise Unsupported(f"{what} is computed at run time and could not be evaluated symbolically")
    return [_dim(v) for v in values]


def _check_bound(cv, dims, what):
    if not cv.bound(dims):
        raise Unsupported(f"{what} {[str(d) for d in dims]} depends on sizes that are not graph input dims")


# ---- data movement ------------------------------------------------------------------------
@handles("Identity", "Dropout")
def _identity(cv, node, ins):
    if node.op_type == "Dropout" and len(node.output) > 1 and cv.is_used(node.output[1]):
        raise Unsupported("Dropout mask output is used")
    return ins[0]


@handles("Transpose")
def _transpose(cv, node, ins):
    x = ins[0]
    perm = attributes(node).get("perm") or list(reversed(range(x.type.rank)))
    if list(perm) == list(range(x.type.rank)):
        return x
    return cv.op.permute(x, dims=tuple(perm))


def _reshape_to(cv, x, shape):
    shape = [canonical_dim(d) for d in shape]
    if not cv.bound(shape):
        unbound = [i for i, d in enumerate(shape) if not cv.bound([d])]
        if len(unbound) != 1:
            raise Unsupported("target shape depends on sizes that are not graph input dims")
        shape[unbound[0]] = -1
    if len(shape) == x.type.rank and all(isinstance(d, int) and d == -1 or dims_equal(d, s)
                                         for d, s in zip(shape, x.type.shape)):
        return x
    return cv.op.reshape(x, shape=tuple(shape))


@handles("Reshape")
def _reshape(cv, node, ins):
    x = ins[0]
    target = _shape_or_raise(cv, node.input[1], "Reshape target")
    allowzero = attributes(node).get("allowzero", 0)
    dims = []
    for i, d in enumerate(target):
        if isinstance(d, int) and d == 0 and not allowzero:
            if i >= x.type.rank:
                raise Unsupported("Reshape copies a dim the input does not have")
            d = x.type.shape[i]
        dims.append(d)
    if dims.count(-1) > 1:
        raise Unsupported("more than one -1 in a Reshape target")
    if -1 in dims:
        rest = sympy.Mul(*[sympy.sympify(d) for d in dims if not (isinstance(d, int) and d == -1)])
        dims[dims.index(-1)] = canonical_dim(sympy.sympify(x.type.numel()) / rest)
    return _reshape_to(cv, x, dims)


@handles("Flatten")
def _flatten(cv, node, ins):
    x = ins[0]
    axis = attributes(node).get("axis", 1)
    axis = axis + x.type.rank if axis < 0 else axis
    lead = canonical_dim(sympy.Mul(*[sympy.sympify(d) for d in x.type.shape[:axis]]))
    rest = canonical_dim(sympy.Mul(*[sympy.sympify(d) for d in x.type.shape[axis:]]))
    return _reshape_to(cv, x, [lead, rest])


def _axes(cv, node, what):
    a = attributes(node)
    if "axes" in a:
        return list(a["axes"])
    if len(node.input) > 1 and node.input[1]:
        axes = cv.concrete_ints(node.input[1])
        if axes is None:
            raise Unsupported(f"{what} axes computed at run time")
        return axes
    return None


@handles("Unsqueeze")
def _unsqueeze(cv, node, ins):
    x = ins[0]
    axes = _axes(cv, node, "Unsqueeze")
    if axes is None:
        raise Unsupported("Unsqueeze without axes")
    rank = x.type.rank + len(axes)
    axes = sorted(normalize_axis(a, rank) for a in axes)
    shape = list(x.type.shape)
    for a in axes:
        shape.insert(a, 1)
    return _reshape_to(cv, x, shape)


@handles("Squeeze")
def _squeeze(cv, node, ins):
    x = ins[0]
    axes = _axes(cv, node, "Squeeze")
    if axes is None:
        if not x.type.is_static:
            raise Unsupported("Squeeze without axes on a symbolic shape")
        axes = [i for i, d in enumerate(x.type.shape) if d == 1]
    axes = {normalize_axis(a, x.type.rank) for a in axes}
    for a in axes:
        if x.type.shape[a] != 1:
            raise Unsupported(f"Squeeze of axis {a} whose size is {x.type.shape[a]}")
    return _reshape_to(cv, x, [d for i, d in enumerate(x.type.shape) if i not in axes])


@handles("Concat")
def _concat(cv, node, ins):
    if any(v is None for v in ins) or len({v.type.dtype for v in ins}) != 1:
        raise Unsupported("mixed dtypes")
    return cv.op.cat(*ins, dim=attributes(node)["axis"])


@handles("Expand")
def _expand(cv, node, ins):
    x = ins[0]
    target = _shape_or_raise(cv, node.input[1], "Expand shape")
    out = list(broadcast_shapes(tuple(x.type.shape), tuple(target)))
    _check_bound(cv, out, "Expand shape")
    if len(out) == x.type.rank and all(dims_equal(a, b) for a, b in zip(out, x.type.shape)):
        return x
    return cv.op.expand(x, shape=tuple(out))


def _slice_bounds(size, start, end):
    """ONNX clamping for a positive step; symbolic sizes assume in-range bounds."""
    if isinstance(size, int):
        if isinstance(start, int):
            start = min(max(start + size if start < 0 else start, 0), size)
        if isinstance(end, int):
            end = min(max(end + size if end < 0 else end, 0), size)
        return start, end
    if isinstance(start, int) and start < 0:
        start = canonical_dim(size + start)
    if isinstance(end, int):
        end = BIG if end >= BIG else canonical_dim(size + end) if end < 0 else end
    return start, end


@handles("Slice")
def _slice(cv, node, ins):
    x = ins[0]
    starts = _shape_or_raise(cv, node.input[1], "Slice starts")
    ends = _shape_or_raise(cv, node.input[2], "Slice ends")
    axes = _shape_or_raise(cv, input_name(node, 3), "Slice axes") if input_name(node, 3) else list(range(len(starts)))
    steps = _shape_or_raise(cv, input_name(node, 4), "Slice steps") if input_name(node, 4) else [1] * len(starts)
    result = x
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if not isinstance(axis, int) or not isinstance(step, int) or step < 1:
            raise Unsupported("Slice with a negative or symbolic step or axis")
        axis = normalize_axis(axis, x.type.rank)
        size = result.type.shape[axis]
        start, end = _slice_bounds(size, start, end)
        _check_bound(cv, [start] + ([end] if not (isinstance(end, int) and end >= BIG) else []), "Slice bounds")
        if isinstance(start, int) and start == 0 and step == 1 and (
                (isinstance(end, int) and end >= BIG) or dims_equal(end, size)):
            continue
        result = cv.op.slice(result, dim=axis, start=start, end=end, step=step)
    return result


@handles("Split")
def _split(cv, node, ins):
    x = ins[0]
    a = attributes(node)
    axis = normalize_axis(a.get("axis", 0), x.type.rank)
    size = x.type.shape[axis]
    n = len(node.output)
    if len(node.input) > 1 and node.input[1]:
        sizes = _shape_or_raise(cv, node.input[1], "Split sizes")
    else:
        if not isinstance(size, int):
            raise Unsupported("even Split of a symbolic dim")
        n = a.get("num_outputs", n)
        chunk = -(-size // n)
        sizes = [min(chunk, size - i * chunk) for i in range(n)]
    outs, start = [], 0
    for s in sizes:
        end = canonical_dim(sympy.sympify(start) + s)
        outs.append(cv.op.slice(x, dim=axis, start=start, end=end, step=1))
        start = end
    return outs


@handles("Gather")
def _gather(cv, node, ins):
    x, idx = ins
    axis = normalize_axis(attributes(node).get("axis", 0), x.type.rank)
    known = cv.known_value(node.input[1])
    size = x.type.shape[axis]
    if known is not None and known.ndim == 0:
        index = _dim(known.item())
        if isinstance(index, int) and isinstance(size, int) and not -size <= index < size:
            raise Unsupported("index out of range")
        return cv.op.select(x, dim=axis, index=index)
    const = cv.const(node.input[1])
    if const is not None:
        values = const.to(torch.int64)
        if bool((values < 0).any()):
            if not isinstance(size, int):
                raise Unsupported("negative indices into a symbolic dim")
            values = torch.where(values < 0, values + size, values)
            idx = cv.tensor_const(values, node.input[1])
        flat = idx if values.dim() == 1 else _reshape_to(cv, idx, [values.numel()])
        picked = cv.op.index_select(x, flat, dim=axis)
        if values.dim() == 1:
            return picked
        shape = list(x.type.shape[:axis]) + list(values.shape) + list(x.type.shape[axis + 1:])
        return _reshape_to(cv, picked, shape)
    if x.is_constant and x.type.rank == 2 and axis == 0:
        return cv.op.embedding(x, _from_start(cv, idx, size))
    if idx.type.rank == 1:
        return cv.op.index_select(x, _from_start(cv, idx, size), dim=axis)
    raise Unsupported("Gather with run-time multi-dimensional indices")


@handles("GatherElements")
def _gather_elements(cv, node, ins):
    x, idx = ins
    axis = normalize_axis(attributes(node).get("axis", 0), x.type.rank)
    const = cv.const(node.input[1])
    if const is not None and isinstance(x.type.shape[axis], int):
        values = const.to(torch.int64)
        idx = cv.tensor_const(torch.where(values < 0, values + x.type.shape[axis], values), node.input[1])
    else:
        idx = _from_start(cv, idx if idx.type.dtype == torch.int64 else cv.op.cast(idx, dtype=torch.int64),
                          x.type.shape[axis])
    return cv.op.gather(x, idx, dim=axis)


def _from_start(cv, idx, size):
    """Run-time ONNX indices may count from the end (-1 is the last); the IR's gather ops, like
    torch's, take them from the start: ``where(idx < 0, idx + size, idx)``."""
    if not isinstance(size, int):
        raise Unsupported("run-time indices, possibly negative, into a symbolic dim")
    dtype = idx.type.dtype
    return cv.op.where(cv.op.lt(idx, cv.scalar(0, dtype)), cv.op.add(idx, cv.scalar(size, dtype)), idx)


# ---- factories ----------------------------------------------------------------------------
@handles("Constant")
def _constant(cv, node, ins):
    a = node.attribute[0] if len(node.attribute) == 1 else None
    if a is None:
        raise Unsupported("Constant without exactly one value attribute")
    if a.name == "value":
        tensor = tensor_from_proto(a.t, node.output[0])
    elif a.name == "value_float":
        tensor = torch.tensor(a.f, dtype=torch.float32)
    elif a.name == "value_floats":
        tensor = torch.tensor(list(a.floats), dtype=torch.float32)
    elif a.name == "value_int":
        tensor = torch.tensor(a.i, dtype=torch.int64)
    elif a.name == "value_ints":
        tensor = torch.tensor(list(a.ints), dtype=torch.int64)
    else:
        raise Unsupported(f"Constant {a.name}")
    value = cv.tensor_const(tensor, node.output[0])
    cv.remember(node.output[0], tensor)
    return value


@handles("Range")
def _range(cv, node, ins):
    values = [cv.known_ints(n) for n in node.input]
    if any(v is None or len(v) != 1 for v in values):
        raise Unsupported("Range bounds computed at run time or not integer")
    start, end, step = (_dim(v[0]) for v in values)
    if not isinstance(step, int) or step < 1:
        raise Unsupported("Range with a non-positive or symbolic step")
    _check_bound(cv, [start, end], "Range bounds")
    return cv.op.arange(start=start, end=end, step=step, dtype=ins[0].type.dtype)


@handles("ConstantOfShape")
def _constant_of_shape(cv, node, ins):
    shape = _shape_or_raise(cv, node.input[0], "ConstantOfShape shape")
    _check_bound(cv, shape, "ConstantOfShape shape")
    value = attributes(node).get("value")
    if value is None:
        dtype, fill = torch.float32, 0.0
    else:
        t = tensor_from_proto(value)
        dtype, fill = t.dtype, t.reshape(-1)[0].item()
    return cv.op.full(shape=tuple(shape), value=fill, dtype=dtype)
