"""ONNX -> IR handlers for arithmetic: elementwise ops, casts, and linear algebra (``MatMul``,
``Gemm``, and the bias ``Add`` after a ``MatMul``, read as ``linear``)."""
from __future__ import annotations

from graphopt.frontends import Unsupported
from graphopt.frontends.onnx.handlers import HANDLERS, attributes, handles, input_name
from graphopt.ir.onnx_common import torch_dtype
from graphopt.ir.types import dims_equal


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
    HANDLERS.register(_t, _binary(_op))


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
          "Cos": "cos", "Sign": "sign", "Round": "round", "Not": "logical_not", "IsNaN": "isnan"}
for _t, _op in _UNARY.items():
    HANDLERS.register(_t, (lambda op_name: lambda cv, node, ins: cv.op(op_name, ins[0]))(_op))


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
        t = cv.const(input_name(node, i))
        if t is None or t.numel() != 1:
            raise Unsupported("Clip with bounds computed at run time")
        bounds.append(t.item())
    lo, hi = bounds
    if lo is None and hi is None:
        return x
    return cv.op.clamp(x, min=lo, max=hi)


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
