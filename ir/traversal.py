"""Walks over a graph's data flow: ``ancestors`` (producers, upwards) and ``descendants`` (users,
downwards).

Both start from a value, a node (its inputs, resp. its outputs) or several of them, go breadth
first, yield each node once, nearest first, and stop after ``limit`` nodes or, with ``depth``, at
the nodes that many steps away (the start's producers / users are one step). ``through(node)``
says whether to walk on past a node; the node itself is yielded either way, so
``ancestors(v, through=lambda n: n.op in LAYOUT)`` yields the first non-layout producers too.
Consumers may stop early: the walk is lazy.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, Union

from graphopt.ir.graph import Node, Value

Start = Union[Value, Node, Iterable[Union[Value, Node]]]


def ancestors(start: Start, *, through: Callable[[Node], bool] | None = None,
              limit: int | None = None, depth: int | None = None) -> Iterator[Node]:
    """The nodes ``start`` is computed from."""
    return _breadth_first(start, _producers, lambda node: node.inputs, through, limit, depth)


def descendants(start: Start, *, through: Callable[[Node], bool] | None = None,
                limit: int | None = None, depth: int | None = None) -> Iterator[Node]:
    """The nodes computed from ``start``."""
    return _breadth_first(start, lambda value: value.users, lambda node: node.outputs, through, limit, depth)


def _breadth_first(start: Start, neighbours, onward, through, limit, depth) -> Iterator[Node]:
    """``neighbours(value)``: the nodes one step away; ``onward(node)``: the values to go on from."""
    items = [start] if isinstance(start, (Value, Node)) else list(start)
    queue = deque((v, 1) for item in items for v in (onward(item) if isinstance(item, Node) else [item]))
    seen: set[int] = set()
    while queue:
        value, step = queue.popleft()
        for node in neighbours(value):
            if id(node) in seen:
                continue
            if limit is not None and len(seen) >= limit:
                return
            seen.add(id(node))
            yield node
            if (depth is None or step < depth) and (through is None or through(node)):
                queue.extend((v, step + 1) for v in onward(node))


def _producers(value: Value | None) -> list[Node]:
    return [value.producer] if value is not None and value.producer is not None else []
