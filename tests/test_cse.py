"""cse, before / expected: equal pure nodes and equal small constants merge; nodes that differ
in an attribute or a constant, and impure nodes, stay apart."""
import torch

from tests.textir import assert_graph, assert_same_numbers, run_pass

BEFORE = """
graph main(%x: f32[batch,6]) {
  %c1: f32[] = constant(2.0)
  %c2: f32[] = constant(2.0)
  %a: f32[batch,2,3] = reshape(%x, shape=[batch,2,3])
  %b: f32[batch,2,3] = reshape(%x, shape=[batch,2,3])
  %ma: f32[batch,2,3] = mul(%a, %c1)
  %mb: f32[batch,2,3] = mul(%b, %c2)
  %y: f32[batch,2,3] = add(%ma, %mb)
  return %y
}"""

EXPECTED = """
graph main(%x: f32[batch,6]) {
  %c: f32[] = constant(2.0)
  %a: f32[batch,2,3] = reshape(%x, shape=[batch,2,3])
  %m: f32[batch,2,3] = mul(%a, %c)
  %y: f32[batch,2,3] = add(%m, %m)
  return %y
}"""


def test_equal_nodes_and_constants_merge():
    after, report = run_pass(BEFORE, "cse")
    assert_graph(after, EXPECTED)
    assert len(after.constants) == 1
    assert report.counters == {"constants_merged": 1, "nodes_merged": 2}
    assert_same_numbers(BEFORE, after, [torch.randn(3, 6)])


DIFFERENT = """
graph main(%x: f32[batch,6]) {
  %r1: f32[batch,6] = opaque(%x, target="aten::rand_like", args=[$0], kwargs={}, out_types=[f32[batch,6]])
  %r2: f32[batch,6] = opaque(%x, target="aten::rand_like", args=[$0], kwargs={}, out_types=[f32[batch,6]])
  %a: f32[batch,2,3] = reshape(%x, shape=[batch,2,3])
  %b: f32[batch,3,2] = reshape(%x, shape=[batch,3,2])
  %two: f32[] = constant(2.0)
  %ma: f32[batch,2,3] = mul(%a, %two)
  %three: f32[] = constant(3.0)
  %mb: f32[batch,2,3] = mul(%a, %three)
  %two64: f64[] = constant(2.0)
  %mc: f32[batch,2,3] = mul(%a, %two64)
  return %ma, %mb, %mc, %b, %r1, %r2
}"""


def test_nodes_that_differ_or_are_random_stay_apart():
    """Different shapes, different constant values or dtypes, and two random draws are not the same value."""
    after, report = run_pass(DIFFERENT, "cse")
    assert_graph(after, DIFFERENT)
    assert report.counters == {}
