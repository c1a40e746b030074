"""Work that must stay linear in the graph: counted, not timed. Each test builds a case of size n
and 4n and compares the operations counted (a linear algorithm grows about 4x, a quadratic one 16x)."""
import torch

from graphopt.ir import Graph, TensorType, verify


class CountingUses(list):
    """A use list that counts the entries each scan of it looks at."""

    touched = 0

    def __iter__(self):
        CountingUses.touched += len(self)
        return super().__iter__()

    def __contains__(self, item):
        CountingUses.touched += len(self)
        return super().__contains__(item)

    def index(self, *args):
        CountingUses.touched += len(self)
        return super().index(*args)


def _use_list_scans_when_verifying(n: int) -> int:
    """One constant read by n nodes: entries of its use list the verifier looks at."""
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, (4,)))
    c = g.add_constant(torch.ones(4), "c")
    out = x
    for _ in range(n):
        out = g.op.add(out, c)
    g.set_outputs([out])
    c.uses = CountingUses(c.uses)
    CountingUses.touched = 0
    verify(g)
    return CountingUses.touched


def test_verifier_is_linear_in_the_uses_of_one_constant():
    small, large = _use_list_scans_when_verifying(500), _use_list_scans_when_verifying(2000)
    assert small >= 500  # every use is looked at
    assert large <= 5 * small, (small, large)


def _python_calls_to_make_inputs(n: int) -> int:
    """A model with n inputs, each with its own symbolic dim: Python calls made to size and make the inputs."""
    import argparse
    import sys

    from graphopt.cli.inputs import model_inputs

    g = Graph()
    values = [g.add_input(f"x{i}", TensorType(torch.float32, (f"d{i}", 2))) for i in range(n)]
    g.set_outputs(values)
    args = argparse.Namespace(calib=None, seed=0, check=True, verify_passes=False)
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        feeds, _, _ = model_inputs(args, g, {})
    finally:
        sys.setprofile(None)
    assert [feeds[f"x{i}"].shape for i in (0, n - 1)] == [(16, 2), (16, 2)]
    return calls


def test_cli_input_dims_are_evaluated_in_linear_time():
    small, large = _python_calls_to_make_inputs(100), _python_calls_to_make_inputs(400)
    assert large <= 5 * small, (small, large)
