"""Structural comparison of graphs (TVM-style ``before``/``expected`` tests).

Two graphs are equal when their outputs are computed by the same ops with the same attributes
from corresponding inputs and equal constants; value names and node order do not matter.
"""
from __future__ import annotations

import torch

from graphopt.ir.graph import Graph, Value
from graphopt.ir.printer import format_attr


def structural_diff(actual: Graph, expected: Graph) -> str | None:
    """None when the graphs match, else a sentence naming the first difference."""
    if len(actual.inputs) != len(expected.inputs):
        return f"{len(actual.inputs)} inputs vs {len(expected.inputs)} expected"
    if len(actual.outputs) != len(expected.outputs):
        return f"{len(actual.outputs)} outputs vs {len(expected.outputs)} expected"
    pairs: dict[int, int] = {id(a): id(e) for a, e in zip(actual.inputs, expected.inputs)}
    for a, e in zip(actual.inputs, expected.inputs):
        if not a.type.matches(e.type):
            return f"input %{a.name}: {a.type} vs expected {e.type}"
    stack = list(zip(actual.outputs, expected.outputs))
    while stack:
        a, e = stack.pop()
        problem = _compare_values(a, e, pairs, stack)
        if problem:
            return problem
    if len(actual) != len(expected):
        return f"{len(actual)} nodes vs {len(expected)} expected (dead code?)"
    return None


def _compare_values(a: Value, e: Value, pairs: dict[int, int], stack: list) -> str | None:
    if id(a) in pairs:
        return None if pairs[id(a)] == id(e) else f"%{a.name} corresponds to two different expected values"
    pairs[id(a)] = id(e)
    if not a.type.matches(e.type):
        return f"%{a.name}: {a.type} vs expected %{e.name}: {e.type}"
    if a.is_constant or e.is_constant:
        if not (a.is_constant and e.is_constant and torch.equal(a.const, e.const)):
            return f"%{a.name} vs expected %{e.name}: constant differs"
        return None
    if (a.producer is None) != (e.producer is None):
        return f"%{a.name} vs expected %{e.name}: one is a graph input"
    na, ne = a.producer, e.producer
    if na.op != ne.op or a.index != e.index:
        return f"%{a.name} is {na.op}[{a.index}], expected {ne.op}[{e.index}]"
    attrs_a = {k: format_attr(v) for k, v in na.attrs.items()}
    attrs_e = {k: format_attr(v) for k, v in ne.attrs.items()}
    if attrs_a != attrs_e:
        return f"{na.label()}: attributes {attrs_a} vs expected {attrs_e}"
    if len(na.inputs) != len(ne.inputs):
        return f"{na.label()}: {len(na.inputs)} inputs vs expected {len(ne.inputs)}"
    for x, y in zip(na.inputs, ne.inputs):
        if (x is None) != (y is None):
            return f"{na.label()}: optional input present in one graph only"
        if x is not None:
            stack.append((x, y))
    return None


def assert_structurally_equal(actual: Graph, expected: Graph) -> None:
    problem = structural_diff(actual, expected)
    if problem:
        raise AssertionError(f"graphs differ: {problem}\n--- actual\n{actual}\n--- expected\n{expected}")
