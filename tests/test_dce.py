"""dce, before / expected: dead chains and unused constants go; outputs and impure nodes stay."""
import torch

from tests.textir import assert_graph, assert_same_numbers, run_pass

BEFORE = """
graph main(%x: f32[4]) {
  %unused: f32[3] = constant([1.0,1.0,1.0])
  %r: f32[4] = relu(%x)
  %t: f32[4] = tanh(%r)
  %noise: f32[4] = opaque(%x, target="aten::rand_like", args=[$0], kwargs={}, out_types=[f32[4]])
  %s: f32[4] = sigmoid(%x)
  return %s, %x
}"""

EXPECTED = """
graph main(%x: f32[4]) {
  %noise: f32[4] = opaque(%x, target="aten::rand_like", args=[$0], kwargs={}, out_types=[f32[4]])
  %s: f32[4] = sigmoid(%x)
  return %s, %x
}"""


def test_dead_chains_and_constants_go_outputs_and_impure_nodes_stay():
    after, report = run_pass(BEFORE, "dce")
    assert_graph(after, EXPECTED)
    assert after.op_counts() == {"opaque": 1, "sigmoid": 1} and not after.constants  # the dead random draw stays
    assert report.counters == {"nodes_removed": 2, "constants_removed": 1}
    assert_same_numbers(BEFORE, after, [torch.randn(4)])
