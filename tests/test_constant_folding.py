"""constant_folding, before / expected: a node of constants becomes its value; symbolic and
growing nodes stay."""
import torch

from tests.textir import assert_graph, assert_same_numbers, run_pass

FOLD_BEFORE = """
graph main(%x: f32[batch,2]) {
  %w: f32[3,2] = constant([[1.0,2.0],[3.0,4.0],[5.0,6.0]])
  %wt: f32[2,3] = permute(%w, dims=[1,0])
  %y: f32[batch,3] = matmul(%x, %wt)
  return %y
}"""

FOLD_EXPECTED = """
graph main(%x: f32[batch,2]) {
  %wt: f32[2,3] = constant([[1.0,3.0,5.0],[2.0,4.0,6.0]])
  %y: f32[batch,3] = matmul(%x, %wt)
  return %y
}"""


def test_permute_of_a_constant_is_folded():
    after, report = run_pass(FOLD_BEFORE, "constant_folding")
    assert_graph(after, FOLD_EXPECTED)
    assert report.counters == {"folded": 1}
    # integer-valued inputs: every product and sum is exact, so the strided and the folded (contiguous)
    # weight give equal numbers whichever GEMM kernel the CPU picks for each layout
    assert_same_numbers(FOLD_BEFORE, after, [torch.randint(-8, 9, (4, 2)).float()])


KEEP = """
graph main(%x: f32[batch,4]) {
  %one: f32[1,4] = constant([[1.0,1.0,1.0,1.0]])
  %unit: f32[1,1] = constant([[1.0]])
  %bias: f32[batch,4] = expand(%one, shape=[batch,4])
  %big: f32[10000,1000] = expand(%unit, shape=[10000,1000])
  %y: f32[batch,4] = add(%x, %bias)
  return %y, %big
}"""


def test_symbolic_and_growing_nodes_stay():
    """The bias expand has a symbolic shape; the other would grow its input 10^7 times."""
    after, report = run_pass(KEEP, "constant_folding")
    assert_graph(after, KEEP)
    assert report.counters == {"skipped_too_large": 1}
