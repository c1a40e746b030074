"""Elementwise ops: arithmetic, activations, comparisons, casts."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from graphopt.ir.opdef import Attr, OpError, register_op
from graphopt.ir.ops.rules import broadcast, compare, float_result, same_as_input

BINARY = ["a", "b"]


# name -> (reference, commutative): the broadcasting arithmetic ops
_ARITHMETIC = {"add": (torch.add, True), "sub": (torch.sub, False), "mul": (torch.mul, True),
               "pow": (torch.pow, False), "maximum": (torch.maximum, True), "minimum": (torch.minimum, True)}
for _name, (_fn, _commutative) in _ARITHMETIC.items():
    register_op(_name, inputs=BINARY, infer=broadcast,
                tags=["elementwise", "commutative"] if _commutative else ["elementwise"])(_fn)


def _div_type(a, b, *, rounding_mode):
    t = broadcast(a, b)
    return t if rounding_mode != "none" or t.dtype.is_floating_point else t.with_dtype(torch.get_default_dtype())


@register_op("div", inputs=BINARY, attrs={"rounding_mode": Attr("str", "none", "none, trunc or floor")},
             infer=_div_type, tags=["elementwise"])
def div(a, b, *, rounding_mode):
    return torch.div(a, b, rounding_mode=None if rounding_mode == "none" else rounding_mode)


def _where_type(cond, a, b):
    if cond.dtype != torch.bool:
        raise OpError(f"where: condition must be bool, got {cond}")
    return broadcast(a, b).with_shape(broadcast(cond.with_dtype(a.dtype), a, b).shape)


@register_op("where", inputs=["cond", "a", "b"], infer=_where_type, tags=["elementwise"])
def where(cond, a, b):
    return torch.where(cond, a, b)


for _name in ["eq", "ne", "lt", "le", "gt", "ge"]:
    register_op(_name, inputs=BINARY, infer=compare, tags=["elementwise"])(getattr(torch, _name))

register_op("logical_and", inputs=BINARY, infer=compare, tags=["elementwise", "commutative"])(torch.logical_and)
register_op("logical_or", inputs=BINARY, infer=compare, tags=["elementwise", "commutative"])(torch.logical_or)


@register_op("logical_not", inputs=["x"], infer=lambda x: x.with_dtype(torch.bool), tags=["elementwise"])
def logical_not(x):
    return torch.logical_not(x)


@register_op("isnan", inputs=["x"], infer=lambda x: x.with_dtype(torch.bool), tags=["elementwise"])
def isnan(x):
    """The NaN test exporters put after a softmax (where(isnan(p), 0, p): a fully masked row gives 0, not NaN)."""
    return torch.isnan(x)


_UNARY_SAME = {"neg": torch.neg, "abs": torch.abs, "relu": torch.relu, "floor": torch.floor,
               "round": torch.round, "sign": torch.sign}
_UNARY_FLOAT = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "exp": torch.exp, "log": torch.log,
                "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "erf": torch.erf, "silu": F.silu,
                "sin": torch.sin, "cos": torch.cos, "reciprocal": torch.reciprocal}
for _name, _fn in _UNARY_SAME.items():
    register_op(_name, inputs=["x"], infer=same_as_input, tags=["elementwise", "unary"])(_fn)
for _name, _fn in _UNARY_FLOAT.items():
    register_op(_name, inputs=["x"], infer=float_result, tags=["elementwise", "unary"])(_fn)


@register_op("gelu", inputs=["x"], attrs={"approximate": Attr("str", "none", "none or tanh")},
             infer=same_as_input, tags=["elementwise", "unary"])
def gelu(x, *, approximate):
    return F.gelu(x, approximate=approximate)


@register_op("clamp", inputs=["x"], attrs={"min": Attr("scalar", None), "max": Attr("scalar", None)},
             infer=same_as_input, tags=["elementwise", "unary"])
def clamp(x, *, min, max):
    return torch.clamp(x, min=min, max=max)


@register_op("cast", inputs=["x"], attrs={"dtype": Attr("dtype")},
             infer=lambda x, *, dtype: x.with_dtype(dtype), tags=["elementwise", "unary"])
def cast(x, *, dtype):
    return x.to(dtype)
