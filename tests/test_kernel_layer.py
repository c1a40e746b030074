"""The kernel layer: (op or fused pattern, target) -> kernel with supports(node) reasons; fusions are
rewrite rules, so why_not and the cpu_integer report say why a chain stayed unfused; an outsider's
backend registers through an entry point and runs a model with its own kernel."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graphopt.backends.cpu_integer import NOT_FUSED, lower_to_kernels
from graphopt.backends.cpu_integer_fusions import RULES, TARGET
from graphopt.backends.kernels import Kernel, fusion_rules, register_kernel, select
from graphopt.ir import Graph, TensorType, list_ops
from graphopt.ir.rewrite import why_not

I32, U8, I8 = torch.int32, torch.uint8, torch.int8


def test_every_integer_op_is_fused_by_a_cpu_integer_rule_or_listed_with_a_reason():
    named = set().union(*(rule.pattern.ops() for rule in fusion_rules(TARGET).rules))
    roots = set().union(*(rule.pattern.root_ops() for rule in RULES))
    integer_ops = {op for op in list_ops() if op.startswith("int.")}
    assert integer_ops - named - set(NOT_FUSED) == set(), "integer ops with neither a rule nor a listed reason"
    assert set(NOT_FUSED) & roots == set(), "listed as not fused, yet a rule starts from it"
    assert set(NOT_FUSED) <= integer_ops, "a listed op no longer exists"


def _linear_requant(m_shape):
    g = torch.Generator().manual_seed(0)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(U8, (3, 16)))
    y = graph.call("int.linear", x, graph.add_constant(torch.randint(-128, 128, (8, 16), generator=g).to(I8)), x_zp=128)
    m = graph.add_constant(torch.randint(1, 255, m_shape, generator=g).to(I32))
    c = graph.add_constant(torch.zeros((), dtype=I32))
    graph.set_outputs([graph.call("int.requant", y, m, c, pre=0, k=12, lo=-128, hi=127, zero_point=0, dtype="i8")])
    return graph


def test_an_unfused_chain_is_explained_by_why_not_and_by_the_report():
    graph = _linear_requant((3, 8))  # m varies along the rows: no per-column epilogue
    explanation = why_not(graph, "gemm_requant")
    assert "did not match" in explanation and "m and c are not constants along the output's column axis" in explanation
    lowered, report = lower_to_kernels(graph, threads=1)
    assert lowered.op_counts().get("cpu.int_gemm") == 1          # the linear alone still became a GEMM
    kept = [why for kernel, why in report if kernel == "reference"]
    assert len(kept) == 1 and "(int.requant)" in kept[0] and "not constants along the last axis" in kept[0]
    assert "matches at 1 node" in why_not(_linear_requant((8,)), "gemm_requant")


def test_select_returns_the_first_kernel_that_supports_the_node_and_the_refusals():
    graph = Graph()
    x = graph.add_input("x", TensorType(torch.float32, (2,)))
    node = graph.op.tanh(x).producer
    register_kernel("test_target", "tanh", supports=lambda n: "never", name="picky")(torch.tanh)
    register_kernel("test_target", "tanh", name="easy")(torch.tanh)
    kernel, refusals = select("test_target", node)
    assert isinstance(kernel, Kernel) and kernel.name == "easy" and refusals == ["picky: never"]
    assert select("test_target", graph.op.exp(x).producer) == (None, ["no test_target kernel implements exp"])


def test_a_duplicate_kernel_is_refused():
    register_kernel("test_target", "sigmoid", name="one")(torch.sigmoid)
    with pytest.raises(LookupError, match="already registered"):
        register_kernel("test_target", "sigmoid", name="one")(torch.sigmoid)


def test_an_outsiders_backend_found_through_its_entry_point_runs_a_model_with_its_kernel():
    plugins = Path(__file__).parent / "plugins"
    script = (
        "import torch, graphopt\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()\n"
        "x = torch.randn(5, 4)\n"
        "from graphopt.backends.registry import list_backends\nassert 'toy' in list_backends()\n"
        "om = graphopt.optimize(model, [], (x,), backend='toy')\n"
        "torch.testing.assert_close(om(x), model(x))\n"
        "import graphopt_toy_backend\n"
        "print(graphopt_toy_backend.CALLS['relu'])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"     # the toy kernel ran, once, in place of the reference relu
