"""Before / expected text tests, as TVM and MLIR write them: a pass test reads as the graph before
(in the printer's text form), the pass, and the graph expected, plus a numerical check where that
says more than the structure."""
from __future__ import annotations

import torch

from graphopt.ir import Graph, assert_structurally_equal, verify
from graphopt.ir.interpreter import run
from graphopt.passes import PassManager


def run_pass(before: str | Graph, name: str, **options):
    """The graph ``before`` (text or graph) after pass ``name``, verified, and the pass's report entry."""
    graph = Graph.parse(before) if isinstance(before, str) else before
    after, report = PassManager([(name, options)]).run(graph)
    verify(after)
    return after, report[name]


def assert_graph(actual: Graph, expected: str) -> None:
    """``actual`` verifies and is the ``expected`` text up to value names and node order."""
    verify(actual)
    assert_structurally_equal(actual, Graph.parse(expected))


def assert_same_numbers(before: str | Graph, after: Graph, inputs, atol: float = 0.0) -> None:
    """``after`` computes what ``before`` computes on ``inputs`` (exactly, unless ``atol``)."""
    graph = Graph.parse(before) if isinstance(before, str) else before
    for got, want in zip(run(after, *inputs), run(graph, *inputs), strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=0.0 if atol == 0.0 else 1e-5)
