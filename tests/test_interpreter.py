"""The reference interpreter (ir/interpreter.py) and the torch backend's kernel choice."""
import pytest
import torch

from graphopt.backends import LoweringError
from graphopt.backends.torch_backend import TorchExecutable
from graphopt.ir import Graph, TensorType
from graphopt.ir.interpreter import InterpreterError, run, to_fx
from graphopt.ir.ops.low_rank import unfused_mlp
from graphopt.ir.types import symbol

F32 = torch.float32


def test_kernels_replace_an_ops_reference_only_where_given():
    g = Graph()
    x = g.add_input("x", TensorType(F32, (3,)))
    g.set_outputs([g.op.exp(g.op.relu(x))])
    t = torch.tensor([-1.0, 0.5, 2.0])
    module = to_fx(g, kernel_for=lambda node: (lambda a: a * 10) if node.op == "relu" else None)
    torch.testing.assert_close(module(t)[0], torch.exp(t * 10))
    torch.testing.assert_close(run(g, t)[0], torch.exp(torch.relu(t)))


def test_torch_backend_runs_the_low_rank_mlp_through_its_kernel_table():
    torch.manual_seed(0)
    n, r1, h, r2, m = 8, 3, 16, 4, 8
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", n)))
    f = [torch.randn(*s) for s in ((r1, n), (h, r1), (h,), (r2, h), (m, r2), (m,))]
    c = [g.add_constant(t) for t in f]
    g.set_outputs([g.op.low_rank_mlp(x, *c, activation="gelu", tile=5)])
    exe = TorchExecutable(g)
    assert "low_rank_mlp_on_device" in exe.graph_module.code       # the backend's kernel, not the op's reference
    xs = torch.randn(6, n)
    torch.testing.assert_close(exe.run_flat(xs)[0], unfused_mlp(xs, *f, activation="gelu"), rtol=1e-4, atol=1e-4)


def test_a_dim_no_input_carries_fails_to_interpret_and_to_lower():
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", 4)))
    g.set_outputs([x, g.op.arange(end=symbol("other"), dtype=torch.int64)])
    with pytest.raises(InterpreterError, match="dim symbol other is not the size of any graph input"):
        to_fx(g)
    with pytest.raises(LoweringError, match="dim symbol other"):
        TorchExecutable(g)
