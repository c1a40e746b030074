"""ONNX -> IR op mapping for the ONNX frontend, and the symbolic evaluation of shape subgraphs.

A handler gets the converter, the ONNX node and its inputs as IR Values (None for an omitted
optional input) and returns the IR Value(s) for the node's outputs, or raises ``Unsupported`` to
keep the node as an ``onnx_opaque`` node. Shape-like inputs (a Reshape's target, Slice's starts)
are read from ``cv.known_ints``: small integer tensors evaluated symbolically by ``propagate``,
so ``Shape(x)[0]`` is the dim ``batch``, not a runtime value.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import sympy
import torch

from graphopt.ir.onnx_common import INT64_MAX, torch_dtype
from graphopt.ir.ops.rules import broadcast_shapes
from graphopt.ir.ops.shape import BIG
from graphopt.ir.types import canonical_dim, dims_equal, normalize_axis


class Unsupported(Exception):
    """This node has no faithful IR translation; it becomes an onnx_opaque node."""


HANDLERS: dict = {}


def handles(*op_types):
    def wrap(fn):
        for t in op_types:
            HANDLERS[t] = fn
        return fn
    return wrap


def attributes(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        if a.ref_attr_name:
            raise Unsupported("attribute reference (inside a function body)")
        value = onnx.helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _input(node, i) -> str:
    return node.input[i] if i < len(node.input) else ""


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


# ---- elementwise --------------------------------------------------------------------------
def _binary(ir_op):
    def handler(cv, node, ins):
        a, b = ins[0], ins[1]
        if a.type.dtype != b.type.dtype:
            raise Unsupported("operands of different dtypes")
        return cv.op(ir_op, a, b)
    return handler


for _t, _op in [("Sub", "sub"), ("Mul", "mul"), ("Equal", "eq"), ("Less", "lt"),
                ("Greater", "gt"), ("LessOrEqual", "le"), ("GreaterOrEqual", "ge"), ("And", "logical_and"),
                ("Or", "logical_or")]:
    HANDLERS[_t] = _binary(_op)


@handles("Div")
def _div(cv, node, ins):
    a, b = ins
    if a.type.dtype != b.type.dtype:
        raise Unsupported("operands of different dtypes")
    mode = "none" if a.type.dtype.is_floating_point else "trunc"
    return cv.op.div(a, b, rounding_mode=mode)


@handles("Pow")
def _pow(cv, node, ins):
    out = cv.op.pow(ins[0], ins[1])
    if out.type.dtype != ins[0].type.dtype:
        raise Unsupported("Pow whose exponent type would promote the base")
    return out


@handles("Max", "Min", "Sum")
def _variadic(cv, node, ins):
    ir_op = {"Max": "maximum", "Min": "minimum", "Sum": "add"}[node.op_type]
    if any(v is None for v in ins) or len({v.type.dtype for v in ins}) != 1:
        raise Unsupported("mixed dtypes")
    result = ins[0]
    for v in ins[1:]:
        result = cv.op(ir_op, result, v)
    return result


_UNARY = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
          "Erf": "erf", "Neg": "neg", "Abs": "abs", "Floor": "floor", "Reciprocal": "reciprocal", "Sin": "sin",
          "Cos": "cos", "Sign": "sign", "Round": "round", "Not": "logical_not"}
for _t, _op in _UNARY.items():
    HANDLERS[_t] = (lambda op_name: lambda cv, node, ins: cv.op(op_name, ins[0]))(_op)


@handles("Gelu")
def _gelu(cv, node, ins):
    return cv.op.gelu(ins[0], approximate=attributes(node).get("approximate", "none"))


@handles("Where")
def _where(cv, node, ins):
    if ins[1].type.dtype != ins[2].type.dtype:
        raise Unsupported("branches of different dtypes")
    return cv.op.where(*ins)


@handles("Cast")
def _cast(cv, node, ins):
    dtype = torch_dtype(attributes(node)["to"])
    return ins[0] if ins[0].type.dtype == dtype else cv.op.cast(ins[0], dtype=dtype)


@handles("CastLike")
def _cast_like(cv, node, ins):
    dtype = ins[1].type.dtype
    return ins[0] if ins[0].type.dtype == dtype else cv.op.cast(ins[0], dtype=dtype)


@handles("Clip")
def _clip(cv, node, ins):
    x = ins[0]
    bounds = []
    for i in (1, 2):
        v = ins[i] if i < len(ins) else None
        if v is None:
            bounds.append(None)
            continue
        t = cv.const(_input(node, i))
        if t is None or t.numel() != 1:
            raise Unsupported("Clip with bounds computed at run time")
        bounds.append(t.item())
    lo, hi = bounds
    if lo is None and hi is None:
        return x
    return cv.op.clamp(x, min=lo, max=hi)


@handles("Identity", "Dropout")
def _identity(cv, node, ins):
    if node.op_type == "Dropout" and len(node.output) > 1 and cv.is_used(node.output[1]):
        raise Unsupported("Dropout mask output is used")
    return ins[0]


@handles("Constant")
def _constant(cv, node, ins):
    a = node.attribute[0] if len(node.attribute) == 1 else None
    if a is None:
        raise Unsupported("Constant without exactly one value attribute")
    if a.name == "value":
        from graphopt.ir.onnx_common import tensor_from_proto
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
    cv._remember(node.output[0], tensor)
    return value


# ---- linear algebra -----------------------------------------------------------------------
@handles("MatMul")
def _matmul(cv, node, ins):
    if ins[0].type.dtype != ins[1].type.dtype:
        raise Unsupported("operands of different dtypes")
    weight = _linear_weight(cv, ins[1])
    if weight is not None and ins[0].type.dtype.is_floating_point and ins[0].type.rank >= 1:
        return cv.op.linear(ins[0], weight)
    return cv.op.matmul(ins[0], ins[1])


def _linear_weight(cv, w):
    """``MatMul(x, W)`` with a constant 2-D ``W`` (exporters write a Linear as ``MatMul(x, Wᵀ)``, or as
    ``MatMul(x, Transpose(W))``) is ``linear(x, Wᵀ)``: the IR's own op, which passes such as
    ``integer_only`` and ``low_rank`` rewrite. Returns the ``[out, in]`` weight, or None."""
    if w.type.rank != 2:
        return None
    if w.is_constant:  # one copy per weight; the ONNX Runtime backend writes it back transposed as '<name>_T'
        if id(w) not in cv.transposed:
            name = w.name[:-2] if w.name.endswith("_T") else w.name + "_t"
            cv.transposed[id(w)] = cv.tensor_const(w.const.t().contiguous(), name)
        return cv.transposed[id(w)]
    producer = w.producer
    if producer is not None and producer.op == "permute" and tuple(producer.attrs["dims"]) == (1, 0) \
            and producer.inputs[0].is_constant:
        return producer.inputs[0]
    return None


@handles("Add")
def _add(cv, node, ins):
    """``linear(x, W) + b`` with a constant ``b`` of the output width, read by nothing else, is
    ``linear(x, W, b)`` (the exporters' bias Add)."""
    a, b = ins
    if a.type.dtype != b.type.dtype:
        raise Unsupported("operands of different dtypes")
    for y, bias, name in ((a, b, node.input[0]), (b, a, node.input[1])):
        producer = y.producer
        if producer is not None and producer.op == "linear" and len(producer.inputs) == 2 and bias.is_constant \
                and cv.use_count(name) == 1 and bias.type.rank == 1 and \
                dims_equal(bias.type.shape[0], producer.inputs[1].type.shape[0]):
            return cv.op.linear(producer.inputs[0], producer.inputs[1], bias)
    return cv.op.add(a, b)


@handles("Gemm")
def _gemm(cv, node, ins):
    a = attributes(node)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    x, w = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    if a.get("transA", 0) or alpha != 1.0 or (c is not None and beta != 1.0):
        raise Unsupported("Gemm with transA, alpha or beta")
    if a.get("transB", 0):
        if c is not None and c.type.rank == 1 and dims_equal(c.type.shape[0], w.type.shape[0]):
            return cv.op.linear(x, w, c)
        y = cv.op.linear(x, w)
    else:
        weight = _linear_weight(cv, w) if x.type.dtype.is_floating_point else None
        if weight is not None and c is not None and c.type.rank == 1 and dims_equal(c.type.shape[0], w.type.shape[1]):
            return cv.op.linear(x, weight, c)
        y = cv.op.linear(x, weight) if weight is not None else cv.op.matmul(x, w)
    return cv.op.add(y, c) if c is not None else y


@handles("Conv")
def _conv(cv, node, ins):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    if x.type.rank != 4 or w.type.rank != 4:
        raise Unsupported("only 2-D convolutions map to conv2d")
    a = attributes(node)
    pad_mode = a.get("auto_pad", "NOTSET")
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if pad_mode == "VALID":
        pads = [0, 0, 0, 0]
    elif pad_mode != "NOTSET":
        raise Unsupported(f"auto_pad={pad_mode}")
    if pads[0] != pads[2] or pads[1] != pads[3]:
        raise Unsupported("asymmetric padding")
    kernel = a.get("kernel_shape")
    if kernel is not None and list(kernel) != list(w.type.shape[2:]):
        raise Unsupported("kernel_shape differs from the weight")
    return cv.op.conv2d(x, w, b, stride=tuple(a.get("strides", [1, 1])), padding=(pads[0], pads[1]),
                        dilation=tuple(a.get("dilations", [1, 1])), groups=a.get("group", 1))


# ---- normalization, softmax, pooling --------------------------------------------------------
@handles("LayerNormalization")
def _layer_norm(cv, node, ins):
    if any(cv.is_used(o) for o in node.output[1:]):
        raise Unsupported("LayerNormalization mean/inv-std outputs are used")
    a = attributes(node)
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    axis = normalize_axis(a.get("axis", -1), x.type.rank)
    normalized = tuple(x.type.shape[axis:])
    for p in (scale, bias):
        if p is not None and (p.type.rank != len(normalized)
                              or not all(dims_equal(u, v) for u, v in zip(p.type.shape, normalized))):
            raise Unsupported("scale or bias shape differs from the normalized shape")
    return cv.op.layer_norm(x, scale, bias, normalized_shape=normalized, eps=float(a.get("epsilon", 1e-5)))


@handles("Softmax")
def _softmax(cv, node, ins):
    return cv.op.softmax(ins[0], dim=attributes(node).get("axis", -1))


@handles("GlobalAveragePool")
def _global_avg_pool(cv, node, ins):
    x = ins[0]
    return cv.op.mean(x, dims=tuple(range(2, x.type.rank)), keepdim=True)


def _reduce_axes(cv, node, ins):
    a = attributes(node)
    if "axes" in a:
        axes = list(a["axes"])
    elif len(node.input) > 1 and node.input[1]:
        axes = cv.concrete_ints(node.input[1])
        if axes is None:
            raise Unsupported("reduction axes computed at run time")
    else:
        axes = []
    return axes, bool(a.get("keepdims", 1)), bool(a.get("noop_with_empty_axes", 0))


@handles("ReduceMean", "ReduceSum", "ReduceMax")
def _reduce(cv, node, ins):
    axes, keepdim, noop = _reduce_axes(cv, node, ins)
    x = ins[0]
    if not axes and noop:
        return x
    ir_op = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "amax"}[node.op_type]
    dims = tuple(normalize_axis(d, x.type.rank) for d in axes) if axes else tuple(range(x.type.rank))
    if ir_op == "mean" and any(x.type.shape[d] == 0 for d in dims):
        raise Unsupported("ReduceMean over an empty axis is undefined in ONNX; ONNX Runtime's value is kept")
    return cv.op(ir_op, x, dims=dims, keepdim=keepdim)


# ---- data movement ------------------------------------------------------------------------
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
    axes = _shape_or_raise(cv, _input(node, 3), "Slice axes") if _input(node, 3) else list(range(len(starts)))
    steps = _shape_or_raise(cv, _input(node, 4), "Slice steps") if _input(node, 4) else [1] * len(starts)
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
        from graphopt.ir.onnx_common import tensor_from_proto
        t = tensor_from_proto(value)
        dtype, fill = t.dtype, t.reshape(-1)[0].item()
    return cv.op.full(shape=tuple(shape), value=fill, dtype=dtype)


# =============================================================================================
# Symbolic evaluation of small integer tensors (shape vectors)
# =============================================================================================
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
