"""Pattern rewriting: before/expected graphs, commutativity, alternatives, optional nodes,
refused cuts, why-not reports, and per-rule counts in the pass report."""
import pytest
import torch

import graphopt
from graphopt.backends.torch_backend import run
from graphopt.ir import Graph, TensorType, assert_structurally_equal, register_op, same_as_input, verify
from graphopt.ir.pattern import either, optional
from graphopt.ir.rewrite import Rule, RuleSet, why_not
from graphopt.passes import PassManager, register_rule_set

F32 = torch.float32


@register_op("test_rw.linear_gelu", inputs=["x", "weight", "bias?"],
             infer=lambda x, w, b=None: x.with_shape(x.shape[:-1] + (w.shape[0],)))
def linear_gelu(x, weight, bias=None):
    return torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias))


def fuse_pattern(op, x, w, b):
    return op.gelu(either(op.linear(x, w, b), op.linear(x, w)), approximate="none")


def fuse_rewrite(op, x, w, b):
    """linear + gelu -> test_rw.linear_gelu"""
    return op("test_rw.linear_gelu", x, w, b)


def constant_weight(ctx, x, w, b):
    return True if w.is_constant else ctx.fail(f"weight %{w.name} is not a constant")


FUSE = Rule("test_rw.fuse_linear_gelu", fuse_pattern, fuse_rewrite, constant_weight)


def mlp_graph(bias=True, weight_input=False):
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", 8)))
    w = g.add_input("w", TensorType(F32, (16, 8))) if weight_input else g.add_constant(torch.randn(16, 8), "w")
    b = g.add_constant(torch.randn(16), "b") if bias else None
    h = g.op.gelu(g.op.linear(x, w, b))
    g.set_outputs([g.op.relu(h)])
    return g


def test_before_expected_and_numerics():
    before = mlp_graph()
    after = before.clone()
    assert RuleSet("fusions", [FUSE]).apply(after) == {"test_rw.fuse_linear_gelu": 1}
    verify(after)
    expected = Graph()
    x = expected.add_input("x", TensorType(F32, ("batch", 8)))
    fused = expected.op("test_rw.linear_gelu", x, expected.add_constant(before.constants["w"].const),
                        expected.add_constant(before.constants["b"].const))
    expected.set_outputs([expected.op.relu(fused)])
    assert_structurally_equal(after, expected)
    t = torch.randn(5, 8)
    torch.testing.assert_close(run(after, t)[0], run(before, t)[0])


def test_alternative_without_bias_matches():
    g = mlp_graph(bias=False)
    assert RuleSet("fusions", [FUSE]).apply(g) == {"test_rw.fuse_linear_gelu": 1}
    assert g.op_counts() == {"relu": 1, "test_rw.linear_gelu": 1}


def test_check_failure_and_why_not_reason():
    g = mlp_graph(weight_input=True)
    assert RuleSet("fusions", [FUSE]).apply(g) == {"test_rw.fuse_linear_gelu": 0}
    report = why_not(g, FUSE)
    assert "did not match" in report and "check failed: weight %w is not a constant" in report


def test_why_not_names_the_mismatching_node():
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", 8)))
    g.set_outputs([g.op.gelu(g.op.matmul(x, g.add_constant(torch.randn(8, 16))))])
    report = why_not(g, FUSE)
    assert "Best partial match rooted at %1 (gelu)" in report
    assert "%0 comes from matmul; the pattern wants linear" in report
    empty = Graph()
    empty.set_outputs([empty.add_input("x", TensorType(F32, (2,)))])
    assert "no gelu node in the graph" in why_not(empty, FUSE)


def test_match_that_would_cut_a_shared_value_is_refused():
    g = mlp_graph()
    linear_out = g.outputs[0].producer.inputs[0].producer.inputs[0]
    g.set_outputs(g.outputs + [g.op.tanh(linear_out)])  # linear's result also used outside the match
    assert RuleSet("fusions", [FUSE]).apply(g) == {"test_rw.fuse_linear_gelu": 0}
    assert "would cut %" in why_not(g, FUSE) and "(tanh) also uses" in why_not(g, FUSE)


def test_commutative_ops_match_both_orders():
    def pattern(op, x, c):
        return op.mul(op.add(x, c), 0.5)

    def check(ctx, x, c):
        return True if c.is_constant else ctx.fail("c is not constant")

    rule = Rule("test_rw.commute", pattern, lambda op, x, c: op.sub(x, op.neg(c)), check)
    for swap in (False, True):
        g = Graph()
        x = g.add_input("x", TensorType(F32, (4,)))
        c = g.add_constant(torch.ones(4), "c")
        half = g.add_constant(torch.tensor(0.5), "half")
        s = g.op.add(c, x) if swap else g.op.add(x, c)
        g.set_outputs([g.op.mul(half, s) if swap else g.op.mul(s, half)])
        assert RuleSet("s", [rule]).apply(g) == {"test_rw.commute": 1}, str(g)
        assert g.op_counts() == {"neg": 1, "sub": 1}
        assert g.outputs[0].producer.inputs[0].name == "x"


def test_optional_node_is_matched_or_skipped():
    def pattern(op, x):
        return op.relu(optional(op.cast(x, dtype=torch.float32)))

    rule = Rule("test_rw.relu_opt_cast", pattern, lambda op, x: op.clamp(op.cast(x, dtype=torch.float32), min=0.0))
    g = Graph()
    a = g.add_input("a", TensorType(torch.float16, (4,)))
    b = g.add_input("b", TensorType(F32, (4,)))
    g.set_outputs([g.op.relu(g.op.cast(a, dtype=F32)), g.op.relu(b)])
    rule_set = RuleSet("s", [rule])
    assert rule_set.apply(g, max_sweeps=1) == {"test_rw.relu_opt_cast": 2}
    verify(g)
    assert g.op_counts() == {"cast": 2, "clamp": 2}


def test_rule_set_as_a_pass_reports_counts():
    register_rule_set(RuleSet("test_rw.fusions", [FUSE]))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.GELU()).eval()
    x = torch.randn(3, 8)
    om = graphopt.optimize(model, ["test_rw.fusions"], (x,), check=True)
    assert om.report["test_rw.fusions"].counters == {"test_rw.fuse_linear_gelu": 2}
    torch.testing.assert_close(om(x), model(x))


def test_sweep_work_is_linear_in_graph_size(monkeypatch):
    """Doubling the graph doubles both the match attempts and the nodes the sweep walks over
    (counted, not timed): no rewrite may rescan the graph."""
    import graphopt.ir.rewrite as rewrite_module
    from graphopt.ir import pattern as pattern_module

    def pattern(op, x, w, b):
        return op.gelu(op.linear(x, w, b), approximate="none")

    def work(layers):
        g = Graph()
        h = g.add_input("x", TensorType(F32, ("batch", 4)))
        for _ in range(layers):
            h = g.op.gelu(g.op.linear(h, g.add_constant(torch.randn(4, 4)), g.add_constant(torch.randn(4))))
        g.set_outputs([h])
        attempts, walked = [], []

        def counting_match(*args, **kwargs):
            attempts.append(1)
            return pattern_module.match(*args, **kwargs)

        original_nodes = Graph.nodes.fget

        def counting_nodes(self):
            for node in original_nodes(self):
                walked.append(1)
                yield node

        monkeypatch.setattr(rewrite_module, "match", counting_match)
        monkeypatch.setattr(Graph, "nodes", property(counting_nodes))
        counts = RuleSet("s", [Rule("test_rw.count", pattern, fuse_rewrite)]).apply(g)
        monkeypatch.undo()
        assert counts == {"test_rw.count": layers}
        return len(attempts), len(walked)

    small, large = work(100), work(200)
    assert large == (2 * small[0], 2 * small[1])
