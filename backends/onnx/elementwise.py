"""ONNX kernels of the elementwise IR ops: arithmetic, comparisons, logic, activations, casts.

Most are one ONNX op of the same inputs cast to the output dtype (``one_op``); the rest say why not
in their docstring or comments (boolean add is ``Or``, integer relu is ``Max``, ...).
"""
from __future__ import annotations

import math

import torch

from graphopt.backends.onnx.emitter import Emitter, out_dtype, register_lowering
from graphopt.ir import Node
from graphopt.ir.onnx_common import onnx_dtype
from graphopt.ir.ops.rules import result_dtype


def one_op(op_type: str):
    """A lowering to one ONNX op of the same inputs, cast to the output dtype."""
    def lower(em: Emitter, node: Node):
        dtype = out_dtype(node)
        return em.one(op_type, [em.input(node, i, dtype) for i in range(len(node.inputs))], em.out(node))
    lower.__name__ = op_type
    return lower


register_lowering("sub")(one_op("Sub"))
register_lowering("maximum")(one_op("Max"))
register_lowering("minimum")(one_op("Min"))


@register_lowering("add")
def _add(em, node):
    op = "Or" if out_dtype(node) is torch.bool else "Add"
    return em.one(op, [em.input(node, 0, out_dtype(node)), em.input(node, 1, out_dtype(node))], em.out(node))


@register_lowering("mul")
def _mul(em, node):
    op = "And" if out_dtype(node) is torch.bool else "Mul"
    return em.one(op, [em.input(node, 0, out_dtype(node)), em.input(node, 1, out_dtype(node))], em.out(node))


def _trunc(em, x, out, dtype):
    negative = em.one("Less", [x, em.literal(0.0, dtype)])
    return em.one("Where", [negative, em.one("Ceil", [x]), em.one("Floor", [x])], out)


@register_lowering("div")
def _div(em, node):
    dtype, mode = out_dtype(node), node.attrs["rounding_mode"]
    a, b = em.input(node, 0, dtype), em.input(node, 1, dtype)
    if mode == "none" or (mode == "trunc" and not dtype.is_floating_point):
        return em.one("Div", [a, b], em.out(node))
    if mode == "floor" and not dtype.is_floating_point:
        remainder = em.one("Mod", [a, b], fmod=0)
        return em.one("Div", [em.one("Sub", [a, remainder]), b], em.out(node))
    quotient = em.one("Div", [a, b])
    if mode == "floor":
        return em.one("Floor", [quotient], em.out(node))
    return _trunc(em, quotient, em.out(node), dtype)


@register_lowering("pow")
def _pow(em, node):
    dtype = out_dtype(node)
    return em.one("Pow", [em.input(node, 0, dtype), em.input(node, 1, dtype)], em.out(node))


@register_lowering("where")
def _where(em, node):
    dtype = out_dtype(node)
    return em.one("Where", [em.input(node, 0, torch.bool), em.input(node, 1, dtype), em.input(node, 2, dtype)],
                  em.out(node))


def _compare(op_type, negate=False):
    def lower(em, node):
        common = result_dtype(node.inputs[0].type, node.inputs[1].type)
        a, b = em.input(node, 0, common), em.input(node, 1, common)
        if negate:
            return em.one("Not", [em.one(op_type, [a, b])], em.out(node))
        return em.one(op_type, [a, b], em.out(node))
    return lower


register_lowering("eq")(_compare("Equal"))
register_lowering("ne")(_compare("Equal", negate=True))
register_lowering("lt")(_compare("Less"))
register_lowering("le")(_compare("LessOrEqual"))
register_lowering("gt")(_compare("Greater"))
register_lowering("ge")(_compare("GreaterOrEqual"))


def _logical(op_type):
    def lower(em, node):
        return em.one(op_type, [em.input(node, i, torch.bool) for i in range(len(node.inputs))], em.out(node))
    return lower


register_lowering("logical_and")(_logical("And"))
register_lowering("logical_or")(_logical("Or"))
register_lowering("logical_not")(_logical("Not"))


@register_lowering("isnan")
def _isnan(em: Emitter, node: Node):
    dtype = node.inputs[0].type.dtype
    x = em.input(node, 0, dtype if dtype.is_floating_point else torch.float32)    # IsNaN takes floats only
    return em.one("IsNaN", [x], em.out(node))


register_lowering("neg")(one_op("Neg"))
register_lowering("abs")(one_op("Abs"))
register_lowering("sign")(one_op("Sign"))
register_lowering("tanh")(one_op("Tanh"))
register_lowering("sigmoid")(one_op("Sigmoid"))
register_lowering("exp")(one_op("Exp"))
register_lowering("log")(one_op("Log"))
register_lowering("sqrt")(one_op("Sqrt"))
register_lowering("erf")(one_op("Erf"))
register_lowering("sin")(one_op("Sin"))
register_lowering("cos")(one_op("Cos"))
register_lowering("reciprocal")(one_op("Reciprocal"))


@register_lowering("relu")
def _relu(em, node):
    x = em.input(node, 0)
    if not out_dtype(node).is_floating_point:  # onnxruntime has no integer Relu kernels
        return em.one("Max", [x, em.literal(0, out_dtype(node))], em.out(node))
    return em.one("Relu", [x], em.out(node))


def _float_only(op_type):
    def lower(em, node):
        if not out_dtype(node).is_floating_point:
            return em.input(node, 0)  # floor/round of an integer is the integer
        return em.one(op_type, [em.input(node, 0)], em.out(node))
    return lower


register_lowering("floor")(_float_only("Floor"))
register_lowering("round")(_float_only("Round"))


@register_lowering("rsqrt")
def _rsqrt(em, node):
    return em.one("Reciprocal", [em.one("Sqrt", [em.input(node, 0, out_dtype(node))])], em.out(node))


@register_lowering("silu")
def _silu(em, node):
    x = em.input(node, 0, out_dtype(node))
    return em.one("Mul", [x, em.one("Sigmoid", [x])], em.out(node))


def emit_gelu(em, x: str, dtype, approximate: str, output: str | None = None) -> str:
    """GELU as ONNX: the Gelu op from opset 20, else its erf or tanh formula."""
    if em.opset >= 20:
        return em.one("Gelu", [x], output, approximate=approximate)
    half, one = em.literal(0.5, dtype), em.literal(1.0, dtype)
    if approximate == "tanh":
        cube = em.one("Mul", [em.one("Mul", [x, x]), x])
        inner = em.one("Add", [x, em.one("Mul", [cube, em.literal(0.044715, dtype)])])
        t = em.one("Tanh", [em.one("Mul", [inner, em.literal(math.sqrt(2 / math.pi), dtype)])])
    else:
        t = em.one("Erf", [em.one("Mul", [x, em.literal(1 / math.sqrt(2), dtype)])])
    return em.one("Mul", [em.one("Mul", [x, half]), em.one("Add", [t, one])], output)


def emit_activation(em, x: str, activation: str, dtype) -> str:
    """One of the fused ops' activations (none, relu, silu, gelu, gelu_tanh) on ONNX tensor ``x``."""
    if activation == "none":
        return x
    if activation == "relu":
        return em.one("Relu", [x])
    if activation == "silu":
        return em.one("Mul", [x, em.one("Sigmoid", [x])])
    return emit_gelu(em, x, dtype, "tanh" if activation == "gelu_tanh" else "none")


@register_lowering("gelu")
def _gelu(em, node):
    dtype = out_dtype(node)
    return emit_gelu(em, em.input(node, 0, dtype), dtype, node.attrs["approximate"], em.out(node))


@register_lowering("clamp")
def _clamp(em, node):
    dtype = out_dtype(node)
    lo, hi = node.attrs["min"], node.attrs["max"]
    return em.one("Clip", [em.input(node, 0, dtype), em.literal(lo, dtype) if lo is not None else "",
                           em.literal(hi, dtype) if hi is not None else ""], em.out(node))


@register_lowering("cast")
def _cast(em, node):
    if node.inputs[0].type.dtype == node.attrs["dtype"]:
        return em.input(node, 0)
    return em.one("Cast", [em.input(node, 0)], em.out(node), to=onnx_dtype(node.attrs["dtype"]))

