"""Pattern rewriting, as before / expected text: alternatives, commutativity, optional nodes,
refused cuts and failed checks with their why-not reasons; per-rule counts in the pass report;
a sweep's work linear in the graph's size."""
import pytest
import torch

import graphopt
from graphopt.ir import Graph, TensorType, register_op
from graphopt.ir.pattern import either, optional
from graphopt.ir.rewrite import Rule, RuleSet, why_not
from graphopt.passes import register_rule_set
from tests.textir import assert_graph, assert_same_numbers

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


MLP = """
graph main(%x: f32[batch,3]{weight_input}) {{
  %w: f32[4,3] = constant([[1.0,-2.0,0.5],[0.25,1.5,-1.0],[2.0,0.0,1.0],[-0.5,0.75,0.125]])
  %b: f32[4] = constant([0.1,-0.2,0.3,-0.4])
  %l: f32[batch,4] = linear(%x, {weight}{bias})
  %g: f32[batch,4] = gelu(%l, approximate="none")
  %y: f32[batch,4] = relu(%g)
  return %y
}}"""

MLP_FUSED = """
graph main(%x: f32[batch,3]) {{
  %w: f32[4,3] = constant([[1.0,-2.0,0.5],[0.25,1.5,-1.0],[2.0,0.0,1.0],[-0.5,0.75,0.125]])
  %b: f32[4] = constant([0.1,-0.2,0.3,-0.4])
  %f: f32[batch,4] = test_rw.linear_gelu(%x, %w{bias})
  %y: f32[batch,4] = relu(%f)
  return %y
}}"""


def mlp_text(bias=True, weight_input=False):
    return MLP.format(weight_input=", %wi: f32[4,3]" if weight_input else "", weight="%wi" if weight_input else "%w",
                      bias=", %b" if bias else "")


def apply_fuse(text):
    graph = Graph.parse(text)
    return graph, RuleSet("fusions", [FUSE]).apply(graph)


@pytest.mark.parametrize("bias", [True, False])
def test_before_expected_and_numerics(bias):
    """With a bias, and without one (the pattern's second alternative)."""
    after, counts = apply_fuse(mlp_text(bias))
    assert counts == {"test_rw.fuse_linear_gelu": 1}
    assert_graph(after, MLP_FUSED.format(bias=", %b" if bias else ""))
    assert_same_numbers(mlp_text(bias), after, [torch.randn(5, 3)])


def test_check_failure_and_why_not_reason():
    before = mlp_text(weight_input=True)
    after, counts = apply_fuse(before)
    assert counts == {"test_rw.fuse_linear_gelu": 0}
    assert_graph(after, before)
    report = why_not(after, FUSE)
    assert "did not match" in report and "check failed: weight %wi is not a constant" in report


def test_why_not_names_the_mismatching_node():
    graph = Graph.parse("""
    graph main(%x: f32[batch,8], %w: f32[8,16]) {
      %0: f32[batch,16] = matmul(%x, %w)
      %1: f32[batch,16] = gelu(%0, approximate="none")
      return %1
    }""")
    report = why_not(graph, FUSE)
    assert "Best partial match rooted at %1 (gelu)" in report
    assert "%0 comes from matmul; the pattern wants linear" in report
    empty = Graph.parse("graph main(%x: f32[2]) {\n  return %x\n}")
    assert "no gelu node in the graph" in why_not(empty, FUSE)


def test_match_that_would_cut_a_shared_value_is_refused():
    before = mlp_text().replace("  return %y", "  %t: f32[batch,4] = tanh(%l)\n  return %y, %t")
    after, counts = apply_fuse(before)  # linear's result is also used outside the match
    assert counts == {"test_rw.fuse_linear_gelu": 0}
    assert_graph(after, before)
    assert "the match would cut %l, which %t (tanh) also uses" in why_not(after, FUSE)


COMMUTE = """
graph main(%x: f32[4]) {
  %c: f32[4] = constant([1.0,2.0,3.0,4.0])
  %half: f32[] = constant(0.5)
  %s: f32[4] = add(%x, %c)
  %y: f32[4] = mul(%s, %half)
  return %y
}"""

COMMUTED = """
graph main(%x: f32[4]) {
  %c: f32[4] = constant([1.0,2.0,3.0,4.0])
  %n: f32[4] = neg(%c)
  %y: f32[4] = sub(%x, %n)
  return %y
}"""


@pytest.mark.parametrize("swap", [False, True])
def test_commutative_ops_match_both_orders(swap):
    def pattern(op, x, c):
        return op.mul(op.add(x, c), 0.5)

    def check(ctx, x, c):
        return True if c.is_constant else ctx.fail("c is not constant")

    rule = Rule("test_rw.commute", pattern, lambda op, x, c: op.sub(x, op.neg(c)), check)
    before = COMMUTE.replace("add(%x, %c)", "add(%c, %x)").replace("mul(%s, %half)", "mul(%half, %s)") if swap else COMMUTE
    graph = Graph.parse(before)
    assert RuleSet("s", [rule]).apply(graph) == {"test_rw.commute": 1}
    assert_graph(graph, COMMUTED)  # the rewrite is a marker, not an equivalent: only the match is tested


def test_optional_node_is_matched_or_skipped():
    def pattern(op, x):
        return op.relu(optional(op.cast(x, dtype=torch.float32)))

    rule = Rule("test_rw.relu_opt_cast", pattern, lambda op, x: op.clamp(op.cast(x, dtype=torch.float32), min=0.0))
    before = """
    graph main(%a: f16[4], %b: f32[4]) {
      %ca: f32[4] = cast(%a, dtype=f32)
      %ra: f32[4] = relu(%ca)
      %rb: f32[4] = relu(%b)
      return %ra, %rb
    }"""
    graph = Graph.parse(before)
    assert RuleSet("s", [rule]).apply(graph, max_sweeps=1) == {"test_rw.relu_opt_cast": 2}
    assert_graph(graph, """
    graph main(%a: f16[4], %b: f32[4]) {
      %ca: f32[4] = cast(%a, dtype=f32)
      %ra: f32[4] = clamp(%ca, min=0.0, max=None)
      %cb: f32[4] = cast(%b, dtype=f32)
      %rb: f32[4] = clamp(%cb, min=0.0, max=None)
      return %ra, %rb
    }""")
    assert_same_numbers(before, graph, [torch.randn(4).half(), torch.randn(4)])


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
