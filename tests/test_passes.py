"""Pass registry and pass manager (the passes' own before / expected tests are in test_<pass>.py)."""
import sys
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.ir import Graph, TensorType, verify
from graphopt.passes import PassConfigError, PassError, PassManager, make_spec, register_pass

F32 = torch.float32


# ---- the registry -------------------------------------------------------------------------
def test_pass_strings_and_objects_parse_the_same():
    s = make_spec("constant_folding:max_numel=100,max_growth=2.5")
    o = make_spec(("constant_folding", {"max_numel": 100, "max_growth": 2.5}))
    assert s.options == o.options == {"max_numel": 100, "max_growth": 2.5, "max_flops": 1 << 32}
    assert str(s) == "constant_folding:max_numel=100,max_growth=2.5"


def test_unknown_pass_and_option_errors_list_close_matches():
    with pytest.raises(PassConfigError, match="unknown pass 'constant_fold'.*did you mean 'constant_folding'"):
        make_spec("constant_fold")
    with pytest.raises(PassConfigError, match="has no option 'max_numl'.*did you mean 'max_numel'"):
        make_spec("constant_folding:max_numl=3")
    with pytest.raises(PassConfigError, match=r"max_numel='many'.*expected int"):
        make_spec("constant_folding:max_numel=many")


def test_list_passes_and_help():
    assert {"constant_folding", "cse", "dce", "decompose_attention"} <= set(graphopt.list_passes())
    text = graphopt.pass_help("constant_folding")
    assert "max_numel (int, default 4194304)" in text


def test_plugin_package_registers_op_and_pass():
    sys.path.insert(0, str(Path(__file__).parent / "plugins"))
    try:
        import graphopt_test_plugin  # noqa: F401
    finally:
        sys.path.pop(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(5, 4)
    om = graphopt.optimize(model, ["graphopt_test_plugin.relu_to_hardswish:limit=1"], (x,), check=True)
    assert om.graph.op_counts().get("graphopt_test_plugin.hardswish") == 1
    expected = model[2](torch.nn.functional.hardswish(model[0](x)))
    torch.testing.assert_close(om(x), expected)
    assert om.report.passes[0].max_abs_error > 0  # lossy, reported not enforced


# ---- the manager is transactional ------------------------------------------------------------
def _small_graph():
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", 4)))
    g.set_outputs([g.op.relu(g.op.tanh(x))])
    return g


@register_pass("test.raises")
def _raises(graph, ctx):
    """Edits the graph, then fails."""
    next(iter(graph.nodes)).attrs["poisoned"] = True
    raise RuntimeError("boom")


@register_pass("test.breaks_verifier")
def _breaks(graph, ctx):
    """Retypes a value without changing its op."""
    graph.outputs[0].type = TensorType(F32, ("batch", 5))


@register_pass("test.changes_numbers", tolerance=1e-6)
def _changes(graph, ctx):
    """Swaps relu for sigmoid, which the numerical check must catch."""
    node = graph.outputs[0].producer
    node.op = "sigmoid"


def test_failing_pass_rolls_back_and_names_itself():
    g = _small_graph()
    before = str(g)
    with pytest.raises(PassError, match=r"pass test.raises: raised RuntimeError: boom.*passes before it: dce"):
        PassManager(["dce", "test.raises"]).run(g)
    assert str(g) == before
    assert all("poisoned" not in n.attrs for n in g.nodes)


def test_verifier_failure_names_pass_and_node():
    g = _small_graph()
    with pytest.raises(PassError, match=r"pass test.breaks_verifier: left an invalid graph: node %1 \(relu\)") as info:
        PassManager(["test.breaks_verifier"]).run(g)
    assert info.value.node.op == "relu"
    verify(g)


def test_numerical_check_catches_a_wrong_pass():
    g = _small_graph()
    x = torch.randn(3, 4)
    with pytest.raises(PassError, match=r"test.changes_numbers: changed the outputs by max abs error .* over its tolerance 1e-06"):
        PassManager(["test.changes_numbers"], example_inputs=[x], check=True).run(g)
    out, report = PassManager(["dce", "cse"], example_inputs=[x], check=True).run(g)
    assert [r.max_abs_error for r in report.passes] == [0.0, 0.0]
    assert all(r.seconds >= 0 for r in report.passes)
