"""Symbolic evaluation of small integer tensors (shape vectors) in an ONNX graph.

``Shape -> Gather -> Concat -> Reshape`` chains compute sizes at run time; evaluated on entries that
are ints, bools or sympy dims, ``Shape(x)[0]`` is the dim ``batch`` and a reshape's target is known
when the graph is converted. What is fully known (static shapes) is folded to constants
(``FOLDABLE``); the rest lets handlers read targets through ``cv.known_ints``.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import sympy
import torch

from graphopt.frontends.onnx.handlers import attributes
from graphopt.ir.onnx_common import INT64_MAX, torch_dtype
from graphopt.ir.types import canonical_dim, dims_equal, normalize_axis

# ops whose results, once fully known (static shapes), become constants
FOLDABLE = {"Shape", "Size", "Gather", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Slice", "Cast", "Add", "Sub",
            "Mul", "Div", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Max", "Min", "Not", "And",
            "Or", "Where", "Range", "ConstantOfShape", "Expand", "Identity", "ReduceProd", "ReduceSum"}


def as_object_array(value) -> np.ndarray:
    """``propagate``'s result as an object array of Python ints, bools and sympy dims."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return value
    out = np.empty((), dtype=object) if not isinstance(value, np.ndarray) else np.empty(value.shape, dtype=object)
    if isinstance(value, np.ndarray):
        for idx, v in np.ndenumerate(value):
            out[idx] = v.item() if hasattr(v, "item") else v
    else:
        out[()] = value
    return out


def _obj(values, shape=None) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr.reshape(shape if shape is not None else (len(values),))


def _canon(arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape, dtype=object)
    for idx, v in np.ndenumerate(arr):
        out[idx] = _canon_entry(v)
    return out


def _canon_entry(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, sympy.Expr):
        if v.is_Integer:
            return int(v)
        return canonical_dim(v) if v.is_number is False or v.free_symbols else v
    if isinstance(v, sympy.logic.boolalg.BooleanAtom):
        return bool(v)
    raise TypeError(f"cannot track {v!r}")


def _floordiv(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a // b if (a >= 0) == (b > 0) else -(-a // b)  # ONNX integer Div truncates
    return canonical_dim(sympy.floor(sympy.sympify(a) / b))


def _compare(fn):
    def cmp(a, b):
        result = fn(sympy.sympify(a), sympy.sympify(b))
        if result not in (sympy.true, sympy.false, True, False):
            raise TypeError("undecidable comparison")
        return bool(result)
    return cmp


def _equal(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    diff = sympy.simplify(sympy.sympify(a) - sympy.sympify(b))
    if diff == 0:
        return True
    # symbolic dims are positive integers: batch != -1 and batch != 0
    if diff.free_symbols and (sympy.ask(sympy.Q.positive(diff)) or sympy.ask(sympy.Q.negative(diff))):
        return False
    if dims_equal(a, b):
        return True
    raise TypeError("undecidable equality")


_ELEMENTWISE = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
    "Equal": _equal, "Less": _compare(lambda a, b: a < b), "Greater": _compare(lambda a, b: a > b),
    "LessOrEqual": _compare(lambda a, b: a <= b), "GreaterOrEqual": _compare(lambda a, b: a >= b),
    "Max": lambda a, b: a if _compare(lambda x, y: x >= y)(a, b) else b,
    "Min": lambda a, b: a if _compare(lambda x, y: x <= y)(a, b) else b,
    "And": lambda a, b: bool(a) and bool(b), "Or": lambda a, b: bool(a) or bool(b),
}


def _elementwise(fn, *arrays):
    b = np.broadcast_arrays(*arrays)
    out = np.empty(b[0].shape, dtype=object)
    for idx in np.ndindex(out.shape):
        out[idx] = fn(*(a[idx] for a in b))
    return out


def propagate(cv, node: onnx.NodeProto, ins) -> list | None:
    """Evaluate the node on small known tensors (entries are ints, floats, bools or sympy dims)."""
    op = node.op_type
    k = [cv.known_value(n) for n in node.input]
    a = attributes(node) if op in _NEEDS_ATTRS else {}
    if op == "Shape":
        x = ins[0]
        dims = list(x.type.shape)
        start, end = a.get("start", 0), a.get("end", len(dims))
        return [_obj(dims[slice(start, end)])]
    if op == "Size":
        return [_obj([ins[0].type.numel()], ())]
    if op == "Identity" or (op == "Dropout" and k and k[0] is not None):
        return [k[0]]
    if not k or any(v is None for v, n in zip(k, node.input) if n):
        if op != "Constant":
            return None
    if op in _ELEMENTWISE and len(k) == 2:
        return [_canon(_elementwise(_ELEMENTWISE[op], k[0], k[1]))]
    if op == "Div":
        return [_canon(_elementwise(_floordiv, k[0], k[1]))] if not ins[0].type.dtype.is_floating_point else None
    if op == "Mod":  # integer Mod (fmod=0) takes the divisor's sign, as Python's %; the legacy exporter's axis arithmetic
        return [_canon(_elementwise(lambda x, y: x % y, k[0], k[1]))] if not a.get("fmod", 0) else None
    if op == "Not":
        return [_elementwise(lambda v: not v, k[0])]
    if op == "Where":
        return [_elementwise(lambda c, x, y: x if c else y, k[0], k[1], k[2])]
    if op == "Cast":
        dtype = torch_dtype(a["to"])
        if dtype.is_floating_point:
            return None
        if dtype is torch.bool:
            return [_elementwise(lambda v: bool(v != 0) if isinstance(v, (int, float)) else True, k[0])]
        return [_elementwise(lambda v: int(v) if isinstance(v, (int, float, bool)) else v, k[0])]
    if op == "Gather":
        axis = a.get("axis", 0)
        idx = np.array(k[1].tolist(), dtype=object)
        size = k[0].shape[axis]
        idx = _elementwise(lambda i: int(i) + size if int(i) < 0 else int(i), idx) if idx.size else idx
        return [np.take(k[0], idx.astype(np.int64), axis=axis)]
    if op == "Concat":
        return [np.concatenate(k, axis=a["axis"])]
    if op == "Unsqueeze":
        axes = [int(v) for v in k[1].reshape(-1)] if len(k) > 1 else list(a.get("axes", []))
        rank = k[0].ndim + len(axes)
        out = k[0]
        for ax in sorted(normalize_axis(x, rank) for x in axes):
            out = np.expand_dims(out, ax)
        return [out]
    if op == "Squeeze":
        axes = [int(v) for v in k[1].reshape(-1)] if len(k) > 1 else list(a.get("axes", []))
        return [np.squeeze(k[0], axis=tuple(normalize_axis(x, k[0].ndim) for x in axes)) if axes else np.squeeze(k[0])]
    if op == "Reshape":
        target = [int(v) for v in k[1].reshape(-1)]
        target = [k[0].shape[i] if t == 0 and not a.get("allowzero", 0) else t for i, t in enumerate(target)]
        return [k[0].reshape(target)]
    if op == "Slice":
        data = k[0]
        starts, ends = [int(v) for v in k[1]], [int(v) for v in k[2]]
        axes = [int(v) for v in k[3]] if len(k) > 3 and k[3] is not None else list(range(len(starts)))
        steps = [int(v) for v in k[4]] if len(k) > 4 and k[4] is not None else [1] * len(starts)
        index = [slice(None)] * data.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            e = None if (st > 0 and e >= INT64_MAX // 2) or (st < 0 and e <= -INT64_MAX // 2) else e
            index[normalize_axis(ax, data.ndim)] = slice(s, e, st)
        return [data[tuple(index)]]
    if op == "Range":
        start, limit, delta = (int(v.item()) for v in k[:3])
        n = max(0, math.ceil((limit - start) / delta))
        return [_obj(list(range(start, start + n * delta, delta)))] if n <= 64 else None
    if op == "ConstantOfShape":
        shape = [int(v) for v in k[0].reshape(-1)]
        if int(np.prod(shape)) > 64:
            return None
        value = a.get("value")
        fill = onnx.numpy_helper.to_array(value).reshape(-1)[0].item() if value is not None else 0.0
        if isinstance(fill, float):
            return None
        return [np.full(shape, fill, dtype=object)]
    if op in ("ReduceProd", "ReduceSum"):
        if len(k) > 1 and k[1] is not None:
            axes = [int(v) for v in k[1].reshape(-1)]
        else:
            axes = list(a.get("axes", []))
        axes = tuple(normalize_axis(x, k[0].ndim) for x in axes) if axes else tuple(range(k[0].ndim))
        reduce = np.prod if op == "ReduceProd" else np.sum
        return [_canon(np.asarray(reduce(k[0], axis=axes, keepdims=bool(a.get("keepdims", 1))), dtype=object))]
    if op == "Expand":
        shape = np.broadcast_shapes(k[0].shape, tuple(int(v) for v in k[1].reshape(-1)))
        # known values are small: check the size before the broadcast copy, not after
        return [np.broadcast_to(k[0], shape).copy()] if math.prod(shape) <= 64 else None
    return None


_NEEDS_ATTRS = {"Shape", "Cast", "Gather", "Concat", "Unsqueeze", "Squeeze", "Reshape", "ConstantOfShape", "ReduceProd",
                "ReduceSum", "Mod"}


__all__ = ["FOLDABLE", "as_object_array", "propagate"]
