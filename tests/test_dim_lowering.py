"""The one symbolic-dim walk (ir/dim_lowering.py) every emitter shares, checked against sympy's own
value of each dim, and through both emitters that use it (fx and ONNX) on a graph whose sizes are
expressions of the input sizes."""
import operator

import pytest
import sympy
import torch

from graphopt.backends.onnxruntime_backend import OnnxRuntimeExecutable, to_onnx
from graphopt.ir import Graph, TensorType
from graphopt.ir.dim_lowering import DimLoweringError, lower_dim
from graphopt.ir.interpreter import run
from graphopt.ir.types import symbol

n, m = sympy.Symbol("n", positive=True, integer=True), sympy.Symbol("m", positive=True, integer=True)


class Evaluate:
    """An algebra computing the value for given sizes, and recording the steps taken."""

    def __init__(self, sizes):
        self.sizes, self.steps = sizes, []

    def const(self, value):
        return value

    def symbol(self, s):
        return self.sizes.get(s)

    def _step(self, name, fn):
        def apply(a, b):
            self.steps.append(name)
            return fn(a, b)
        return apply

    def __getattr__(self, name):
        fns = {"add": operator.add, "mul": operator.mul, "floordiv": operator.floordiv, "max": max, "min": min}
        return self._step(name, fns[name])


DIMS = [n + 3, 2 * n * m, n * m / 4, sympy.Rational(3, 2) * n, n / m, n ** 2 + 1, sympy.floor(n / 3),
        sympy.ceiling(n / 4), sympy.ceiling((n - 1) / m) + 1, sympy.Max(n, m + 2), sympy.Min(n, 5), 7]


@pytest.mark.parametrize("expr", DIMS, ids=str)
@pytest.mark.parametrize("sizes", [(8, 3), (13, 4), (1, 1)])
def test_each_form_lowers_to_its_integer_value(expr, sizes):
    values = {n: sizes[0], m: sizes[1]}
    exact = sympy.sympify(expr).subs(values)
    expected = int(sympy.floor(exact))   # a size expression divides exactly, or floors (the IR's meaning)
    assert lower_dim(expr, Evaluate(values)) == expected


def test_a_repeated_sub_expression_is_computed_once_with_a_memo():
    algebra, memo = Evaluate({n: 6, m: 2}), {}
    lower_dim(n * m + 1, algebra, memo=memo)
    steps = len(algebra.steps)
    assert lower_dim(n * m + 1, algebra, memo=memo) == 13 and len(algebra.steps) == steps
    lower_dim(n * m + 2, algebra, memo=memo)
    assert algebra.steps[steps:] == ["add"]   # n*m came from the memo


def test_errors_name_the_dim_and_the_node():
    with pytest.raises(DimLoweringError, match=r"dim n \+ 1 \(node %y \(reshape\)\).*dim symbol n is not the size of "
                                               "any graph input axis"):
        lower_dim(n + 1, Evaluate({}), where="%y (reshape)")
    with pytest.raises(ValueError, match=r"cannot compute dim log\(n\) at run time \(node %z \(full\)\)"):
        lower_dim(sympy.log(n), Evaluate({n: 2}), where="%z (full)", error=ValueError)


def test_fx_and_onnx_compute_the_same_run_time_sizes():
    """arange(ceil(batch / 4) * 2 + max(batch, 6)) through the interpreter and ONNX Runtime."""
    batch = symbol("batch")
    g = Graph("dims")
    x = g.add_input("x", TensorType(torch.float32, (batch, 3)))
    end = sympy.ceiling(batch / 4) * 2 + sympy.Max(batch, 6)
    g.set_outputs([g.op.arange(end=end, dtype=torch.int64), g.op.relu(x)])
    exe = OnnxRuntimeExecutable(g, threads=1)
    for rows in (1, 5, 9):
        xs = torch.randn(rows, 3)
        expected = torch.arange(-(-rows // 4) * 2 + max(rows, 6))
        torch.testing.assert_close(run(g, xs)[0], expected)
        torch.testing.assert_close(exe.run_flat(xs)[0], expected)
    assert {n.op_type for n in to_onnx(g).graph.node} >= {"Shape", "Div", "Max"}
