"""Patterns over the IR, written as small Python functions over an op builder.

    def pattern(op, x, w, b):
        return op.gelu(op.linear(x, w, b))

Parameters after ``op`` are variables (match any value; a variable used twice must match the same
value). ``op.NAME(...)`` matches a node of that op with exactly those inputs and with the given
attributes (attributes left out are free). Python numbers match scalar constants. ``either(a, b)``
matches any alternative; ``optional(op.cast(x, ...))`` matches the node or, skipping it, its first
input. Commutative ops (tagged in the registry) match both input orders.

Matching is a backtracking walk from the pattern's root down its inputs; it only touches nodes
the pattern reaches, so a sweep over a graph is linear in the graph's size.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from graphopt.ir.graph import Node, Value
from graphopt.ir.opdef import get_op
from graphopt.ir.printer import format_attr


class PValue:
    """A pattern value."""


@dataclass(eq=False)
class PVar(PValue):
    name: str


@dataclass(eq=False)
class PNode(PValue):
    op: str
    inputs: list
    attrs: dict
    index: int = 0


@dataclass(eq=False)
class PEither(PValue):
    alternatives: list


def either(*alternatives) -> PEither:
    return PEither(list(alternatives))


def optional(node: PNode) -> PEither:
    """The node, or (skipping it) its first input."""
    if not isinstance(node, PNode) or not node.inputs:
        raise TypeError("optional() takes an op application with at least one input, e.g. optional(op.cast(x))")
    return PEither([node, node.inputs[0]])


class PatternBuilder:
    """The ``op`` handed to pattern functions: ``op.linear(x, w)``, ``op("mypkg.swish", x)``."""

    def __call__(self, name: str, *inputs, _index: int = 0, **attrs) -> PNode:
        get_op(name)
        return PNode(name, list(inputs), attrs, _index)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        get_op(name)
        return lambda *inputs, **attrs: self(name, *inputs, **attrs)


@dataclass
class Pattern:
    root: PValue
    variables: list[str]

    @staticmethod
    def from_function(fn: Callable) -> "Pattern":
        names = list(inspect.signature(fn).parameters)[1:]
        root = fn(PatternBuilder(), *[PVar(n) for n in names])
        if not isinstance(root, (PNode, PEither)):
            raise TypeError(f"pattern {fn.__name__} must return an op application, got {root!r}")
        return Pattern(root, names)

    def root_ops(self) -> set[str]:
        def ops(p):
            if isinstance(p, PNode):
                return {p.op}
            if isinstance(p, PEither):
                return set().union(*(ops(a) for a in p.alternatives))
            return set()
        return ops(self.root)

    def values(self) -> list[PValue]:
        """Every distinct pattern value (nodes, variables, alternatives), each once."""
        seen: dict[int, PValue] = {}

        def walk(p):
            if id(p) in seen:
                return
            seen[id(p)] = p
            for child in (p.inputs if isinstance(p, PNode) else p.alternatives if isinstance(p, PEither) else []):
                walk(child)
        walk(self.root)
        return list(seen.values())

    def ops(self) -> set[str]:
        """Every op the pattern names, at any depth."""
        return {p.op for p in self.values() if isinstance(p, PNode)}

    def size(self) -> int:
        return len(self.values())


@dataclass
class Binding:
    """A (partial) match: pattern variables -> values, pattern nodes -> graph nodes."""
    values: dict[str, Value] = field(default_factory=dict)
    nodes: dict[int, Node] = field(default_factory=dict)

    def copy(self) -> "Binding":
        return Binding(dict(self.values), dict(self.nodes))

    @property
    def matched_nodes(self) -> list[Node]:
        return list(dict.fromkeys(self.nodes.values()))


@dataclass
class Progress:
    """The deepest point a failed match reached: for the why-not report."""
    matched: int = -1
    reason: str = ""
    at: Node | None = None

    def record(self, binding: Binding, reason: str, at: Node | None) -> None:
        depth = len(binding.matched_nodes)
        if depth > self.matched:
            self.matched, self.reason, self.at = depth, reason, at


def match(pattern: PValue, value: Value, binding: Binding, progress: Progress, site: Node | None = None) -> Iterator[Binding]:
    if isinstance(pattern, PVar):
        bound = binding.values.get(pattern.name)
        if bound is None:
            b = binding.copy()
            b.values[pattern.name] = value
            yield b
        elif bound is value:
            yield binding
        else:
            progress.record(binding, f"variable {pattern.name} is %{bound.name} elsewhere but %{value.name} here", site)
        return
    if isinstance(pattern, (int, float, bool)):
        if value.is_constant and value.const.numel() == 1 and _close(value.const, pattern):
            yield binding
        else:
            progress.record(binding, f"%{value.name} is not the constant {pattern}", site)
        return
    if isinstance(pattern, PEither):
        for alternative in pattern.alternatives:
            yield from match(alternative, value, binding, progress, site)
        return
    assert isinstance(pattern, PNode)
    node = value.producer
    if node is None:
        kind = "a constant" if value.is_constant else "a graph input"
        progress.record(binding, f"%{value.name} is {kind}; the pattern wants {pattern.op}", site)
        return
    if node.op != pattern.op or value.index != pattern.index:
        progress.record(binding, f"%{value.name} comes from {node.op}; the pattern wants {pattern.op}", node)
        return
    if id(pattern) in binding.nodes:
        if binding.nodes[id(pattern)] is node:
            yield binding
        return
    for name, want in pattern.attrs.items():
        have = node.attrs.get(name)
        if format_attr(have) != format_attr(want):
            progress.record(binding, f"{node.label()}: attribute {name}={format_attr(have)}, the pattern wants {format_attr(want)}", node)
            return
    if len(node.inputs) != len(pattern.inputs):
        progress.record(binding, f"{node.label()} has {len(node.inputs)} inputs, the pattern gives {len(pattern.inputs)}", node)
        return
    b = binding.copy()
    b.nodes[id(pattern)] = node
    orders = [list(node.inputs)]
    if len(node.inputs) == 2 and "commutative" in get_op(node.op).tags:
        orders.append(orders[0][::-1])
    for inputs in orders:
        yield from _match_inputs(pattern.inputs, inputs, b, progress, node)


def _match_inputs(patterns, values, binding, progress, node) -> Iterator[Binding]:
    if not patterns:
        yield binding
        return
    head, value = patterns[0], values[0]
    if value is None:
        progress.record(binding, f"{node.label()}: an optional input is absent", node)
        return
    for b in match(head, value, binding, progress, node):
        yield from _match_inputs(patterns[1:], values[1:], b, progress, node)


def _close(tensor: torch.Tensor, number) -> bool:
    return abs(float(tensor.reshape(()).item()) - float(number)) <= 1e-6 * max(1.0, abs(float(number)))


def variables_of(pattern: Pattern, binding: Binding) -> dict[str, Any]:
    return {name: binding.values.get(name) for name in pattern.variables}
