"""Walks over a graph's data flow: ``ancestors`` (producers, upwards) and ``descendants`` (users,
downwards).

Both start from a value, a node (its inputs, resp. its outputs) or several of them, go breadth
first, yield each node once, nearest first, and stop after ``limit`` nodes. ``through(node)``
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
              limit: int | None = None) -> Iterator[Node]:
    """The nodes ``start`` is computed from."""
    queue = deque(v for item in _items(start) for v in (item.inputs if isinstance(item, Node) else [item]))
    seen: set[int] = set()
    while queue:
        node = _producer(queue.popleft())
        if node is None or id(node) in seen:
            continue
        if limit is not None and len(seen) >= limit:
            return
        seen.add(id(node))
        yield node
        if through is None or through(node):
            queue.extend(node.inputs)


def descendants(start: Start, *, through: Callable[[Node], bool] | None = None,
                limit: int | None = None) -> Iterator[Node]:
    """The nodes computed from ``start``."""
    queue = deque(v for item in _items(start) for v in (item.outputs if isinstance(item, Node) else [item]))
    seen: set[int] = set()
    while queue:
        for user in queue.popleft().users:
            if id(user) in seen:
                continue
            if limit is not None and len(seen) >= limit:
                return
            seen.add(id(user))
            yield user
            if through is None or through(user):
                queue.extend(user.outputs)


def _items(start: Start) -> list:
    return [start] if isinstance(start, (Value, Node)) else list(start)


def _producer(value: Value | None) -> Node | None:
    return value.producer if value is not None else None
