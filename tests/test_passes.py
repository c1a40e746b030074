"""Pass registry, pass manager, and the cleanup passes (before / expected / numerics)."""
import math
import sys
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.backends.torch_backend import run
from graphopt.ir import Graph, TensorType, assert_structurally_equal, verify
from graphopt.passes import PassConfigError, PassError, PassManager, make_spec, register_pass

F32 = torch.float32


def run_pass(graph, name, **options):
    out, report = PassManager([(name, options)]).run(graph)
    verify(out)
    return out, report


# ---- cleanup passes: before / expected -------------------------------------------------------
def test_constant_folding_before_expected():
    w = torch.randn(8, 4)
    before = Graph()
    x = before.add_input("x", TensorType(F32, ("batch", 4)))
    wt = before.op.permute(before.add_constant(w, "w"), dims=(1, 0))
    before.set_outputs([before.op.matmul(x, wt)])

    expected = Graph()
    ex = expected.add_input("x", TensorType(F32, ("batch", 4)))
    expected.set_outputs([expected.op.matmul(ex, expected.add_constant(w.t().contiguous()))])

    after, report = run_pass(before, "constant_folding")
    assert_structurally_equal(after, expected)
    assert report["constant_folding"].counters["folded"] == 1
    t = torch.randn(3, 4)
    torch.testing.assert_close(run(after, t)[0], t @ w.t())


def test_constant_folding_keeps_symbolic_and_growing_nodes():
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", 4)))
    bias = g.op.expand(g.add_constant(torch.ones(1, 4)), shape=(x.type.shape[0], 4))  # symbolic: cannot fold
    big = g.op.expand(g.add_constant(torch.ones(1, 1)), shape=(10000, 1000))          # would grow 10^7 times
    g.set_outputs([g.op.add(x, bias), big])
    after, report = run_pass(g, "constant_folding")
    assert after.op_counts()["expand"] == 2
    assert report["constant_folding"].counters == {"skipped_too_large": 1}


def test_cse_before_expected():
    before = Graph()
    x = before.add_input("x", TensorType(F32, ("batch", 6)))
    a = before.op.reshape(x, shape=(x.type.shape[0], 2, 3))
    b = before.op.reshape(x, shape=(x.type.shape[0], 2, 3))
    c1 = before.add_constant(torch.tensor(2.0))
    c2 = before.add_constant(torch.tensor(2.0))
    before.set_outputs([before.op.add(before.op.mul(a, c1), before.op.mul(b, c2))])

    expected = Graph()
    ex = expected.add_input("x", TensorType(F32, ("batch", 6)))
    m = expected.op.mul(expected.op.reshape(ex, shape=(ex.type.shape[0], 2, 3)), expected.add_constant(torch.tensor(2.0)))
    expected.set_outputs([expected.op.add(m, m)])

    after, report = run_pass(before, "cse")
    assert_structurally_equal(after, expected)
    assert report["cse"].counters == {"constants_merged": 1, "nodes_merged": 2}


def test_dce_removes_dead_chains_but_keeps_outputs():
    g = Graph()
    x = g.add_input("x", TensorType(F32, (4,)))
    g.op.tanh(g.op.relu(x))  # dead chain
    g.add_constant(torch.ones(3), "unused")
    g.set_outputs([g.op.sigmoid(x)])
    after, report = run_pass(g, "dce")
    assert after.op_counts() == {"sigmoid": 1}
    assert not after.constants
    assert report["dce"].counters == {"nodes_removed": 2, "constants_removed": 1}


@pytest.mark.parametrize("causal,mask_kind", [(False, None), (False, "bool"), (False, "float"), (True, None)])
def test_decompose_attention_matches_sdpa(causal, mask_kind):
    torch.manual_seed(0)
    g = Graph()
    q = g.add_input("q", TensorType(F32, ("batch", 4, 10, 16)))
    k = g.add_input("k", TensorType(F32, ("batch", 4, 10, 16)))
    v = g.add_input("v", TensorType(F32, ("batch", 4, 10, 8)))
    inputs = [torch.randn(3, 4, 10, 16), torch.randn(3, 4, 10, 16), torch.randn(3, 4, 10, 8)]
    mask = None
    if mask_kind == "bool":
        mask = g.add_input("m", TensorType(torch.bool, ("batch", 1, 1, 10)))
        inputs.append(torch.rand(3, 1, 1, 10) > 0.3)
        inputs[-1][..., 0] = True
    elif mask_kind == "float":
        mask = g.add_input("m", TensorType(F32, ("batch", 1, 10, 10)))
        inputs.append(torch.randn(3, 1, 10, 10))
    g.set_outputs([g.op.sdpa(q, k, v, mask, is_causal=causal)])
    after, _ = run_pass(g, "decompose_attention")
    assert "sdpa" not in after.op_counts() and after.op_counts()["softmax"] == 1
    ref = torch.nn.functional.scaled_dot_product_attention(*inputs[:3], attn_mask=inputs[3] if mask is not None else None,
                                                           is_causal=causal)
    torch.testing.assert_close(run(after, *inputs)[0], ref, atol=1e-5, rtol=1e-5)
    scale = [n for n in after.nodes if n.op == "mul"][0].inputs[1].const
    assert scale.item() == pytest.approx(1 / math.sqrt(16))


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
