"""GELU written out by exporters and model code, folded back into one ``gelu`` op.

    x * 0.5 * (1 + erf(x / sqrt(2)))                          -> gelu(x)
    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))   -> gelu(x, approximate="tanh")

Later passes (integer-only ShiftGELU, fused low-rank MLPs) and the structure analysis see one op.
"""
from __future__ import annotations

import math

from graphopt.ir.pattern import either
from graphopt.ir.rewrite import Rule, RuleSet
from graphopt.passes.registry import register_rule_set


def _half_x_times(op, x, rest):
    return either(op.mul(op.mul(x, 0.5), rest), op.mul(x, op.mul(rest, 0.5)), op.mul(op.mul(rest, x), 0.5))


def erf_pattern(op, x):
    scaled = either(op.div(x, math.sqrt(2.0)), op.mul(x, 1.0 / math.sqrt(2.0)))
    return _half_x_times(op, x, op.add(op.erf(scaled), 1.0))


def erf_rewrite(op, x):
    """x/2 * (1 + erf(x/sqrt 2)) -> gelu(x)"""
    return op.gelu(x)


def tanh_pattern(op, x):
    cubic = op.mul(op.pow(x, 3.0), 0.044715)
    inner = op.mul(op.add(x, cubic), math.sqrt(2.0 / math.pi))
    return _half_x_times(op, x, op.add(op.tanh(inner), 1.0))


def tanh_rewrite(op, x):
    """x/2 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) -> gelu(x, approximate=tanh)"""
    return op.gelu(x, approximate="tanh")


def floating_same_type(ctx, x):
    """A float x, and every value of the match typed like x: a constant of shape [1,1,1] (or of a wider
    float type) would broadcast (or promote) x, and gelu(x) would then change the output's type."""
    if not x.type.dtype.is_floating_point:
        return ctx.fail(f"%{x.name} is not a float tensor")
    for node in ctx.nodes:
        for out in node.outputs:
            if not out.type.matches(x.type):
                return ctx.fail(f"%{out.name} is {out.type} but %{x.name} is {x.type}: a constant broadcasts or "
                                "promotes x, so one gelu(x) would change the result's type")
    return True


FUSE_GELU = RuleSet("fuse_gelu", [Rule("fuse_gelu.erf", erf_pattern, erf_rewrite, floating_same_type),
                                  Rule("fuse_gelu.tanh", tanh_pattern, tanh_rewrite, floating_same_type)])
register_rule_set(FUSE_GELU, tolerance=1e-5)
