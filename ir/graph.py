"""Graph, Node and Value: an SSA graph of tensor ops.

Nodes live in a doubly linked list in execution order, so inserting or erasing anywhere is
O(1) and a pass over a 100,000-node graph stays linear. Constants (weights, buffers) are Values
with a tensor and no producer; the tensor is shared, never copied, by clones of the graph.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

from graphopt.ir.opdef import OpError, get_op
from graphopt.ir.types import TensorType


class GraphError(Exception):
    """An edit that would leave the graph invalid."""


class Value:
    __slots__ = ("name", "type", "producer", "index", "uses", "const", "__weakref__")

    def __init__(self, name: str, type: TensorType, producer: "Node | None" = None, index: int = 0,
                 const: torch.Tensor | None = None):
        self.name = name
        self.type = type
        self.producer = producer
        self.index = index
        self.uses: list[tuple[Node, int]] = []
        self.const = const

    @property
    def is_constant(self) -> bool:
        return self.const is not None

    @property
    def users(self) -> list["Node"]:
        """Distinct consuming nodes, in first-use order."""
        return list(dict.fromkeys(node for node, _ in self.uses))

    @property
    def sole_user(self) -> "Node | None":
        """The node using this value when that is its only use and the value is not a graph output, i.e.
        when a rewrite may fold the value into that node; else None."""
        graph = self.producer.graph if self.producer is not None else None
        if len(self.uses) != 1 or (graph is not None and any(o is self for o in graph.outputs)):
            return None
        return self.uses[0][0]

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    __slots__ = ("op", "inputs", "attrs", "outputs", "meta", "graph", "prev", "next", "__weakref__")

    def __init__(self, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any]):
        self.op = op
        self.inputs: list[Value | None] = list(inputs)
        self.attrs = attrs
        self.outputs: list[Value] = []
        self.meta: dict[str, Any] = {}
        self.graph: Graph | None = None
        self.prev: Node | None = None
        self.next: Node | None = None

    @property
    def schema(self):
        return get_op(self.op)

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise GraphError(f"node {self.label()} has {len(self.outputs)} outputs; use .outputs")
        return self.outputs[0]

    def label(self) -> str:
        names = ",".join("%" + v.name for v in self.outputs) or "<no outputs>"
        return f"{names} ({self.op})"

    def __repr__(self) -> str:
        return f"<Node {self.label()}>"


class Graph:
    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.constants: dict[str, Value] = {}
        self.meta: dict[str, Any] = {}
        self._head: Node | None = None
        self._tail: Node | None = None
        self._count = 0
        self._names: set[str] = set()
        self._next_id = 0
        self._insert_before: Node | None = None  # None means append at the end
        self._journal: list[Callable[[], None]] | None = None  # undo steps while a checkpoint is open
        self._created: list[Node] = []  # nodes created while a checkpoint is open
        self._checkpoints: list[Checkpoint] = []

    @classmethod
    def parse(cls, text: str, constants: dict[str, torch.Tensor] | None = None) -> "Graph":
        """The graph written in the printer's text form (``str(graph)``); constants printed by name
        take their tensors from ``constants``. See ``graphopt.ir.parser``."""
        from graphopt.ir.parser import parse_graph
        return parse_graph(text, constants)

    # ---- names ---------------------------------------------------------------------------
    def fresh_name(self, base: str | None = None) -> str:
        if base is not None and base not in self._names:
            self._take_name(base)
            return base
        while True:
            name = f"{base}_{self._next_id}" if base else str(self._next_id)
            self._next_id += 1
            if name not in self._names:
                self._take_name(name)
                return name

    def has_name(self, name: str) -> bool:
        return name in self._names

    def rename(self, value: Value, name: str) -> None:
        """Give ``value`` a name no other value of the graph has."""
        if name == value.name:
            return
        if name in self._names:
            raise GraphError(f"cannot rename %{value.name} to %{name}: the name is taken")
        old = value.name
        self._take_name(name)
        self._names.discard(old)
        value.name = name
        if self.constants.get(old) is value:
            self.constants = {name if k == old else k: v for k, v in self.constants.items()}

        def undo():
            if self.constants.get(name) is value:
                self.constants = {old if k == name else k: v for k, v in self.constants.items()}
            value.name = old
            self._names.add(old)
        self._record(undo)

    def _take_name(self, name: str) -> None:
        self._names.add(name)
        self._record(lambda: self._names.discard(name))

    # ---- building ------------------------------------------------------------------------
    def add_input(self, name: str, type: TensorType) -> Value:
        value = Value(self.fresh_name(name), type)
        self.inputs.append(value)
        self._record(lambda: self.inputs.remove(value))
        return value

    def add_constant(self, tensor: torch.Tensor, name: str | None = None) -> Value:
        """Register a weight or constant; the tensor object itself is kept (no copy)."""
        if not isinstance(tensor, torch.Tensor):
            raise GraphError(f"constant {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
        value = Value(self.fresh_name(name or "c"), TensorType.of(tensor), const=tensor)
        self.constants[value.name] = value
        self._record(lambda: self.constants.pop(value.name))
        return value

    def set_outputs(self, values: Sequence[Value]) -> None:
        if self._journal is not None:
            self._record(self._restorer(outputs=True))
        self.outputs = list(values)

    def create_node(self, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None, *,
                    names: Sequence[str] | None = None, meta: dict[str, Any] | None = None) -> Node:
        """Create a node at the insertion point; attributes are checked and output types inferred."""
        schema = get_op(op)
        inputs = list(inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        problem = schema.check_arity(len(inputs))
        if problem:
            raise OpError(f"{op}: {problem}")
        attrs = schema.complete_attrs(attrs or {})
        types = schema.infer_types([v.type if v is not None else None for v in inputs], attrs)
        node = Node(op, inputs, attrs)
        anchor = self._insert_before
        if anchor is not None:  # code inserted for a node usually belongs to the same module
            node.meta.update({k: anchor.meta[k] for k in ("module", "module_type") if k in anchor.meta})
        node.meta.update(meta or {})
        for i, t in enumerate(types):
            base = names[i] if names and i < len(names) else None
            node.outputs.append(Value(self.fresh_name(base), t, node, i))
        for i, v in enumerate(inputs):
            if v is not None:
                v.uses.append((node, i))
        self._link(node, self._insert_before)
        if self._journal is not None:
            self._created.append(node)

            def undo():
                for i, v in enumerate(inputs):
                    if v is not None:
                        v.uses.remove((node, i))
                self._unlink(node)
            self._record(undo)
        return node

    def call(self, op: str, *inputs: Value | None, **attrs) -> Value | tuple[Value, ...]:
        node = self.create_node(op, inputs, attrs)
        return node.outputs[0] if len(node.outputs) == 1 else tuple(node.outputs)

    @property
    def op(self) -> "OpBuilder":
        """``graph.op.relu(x)`` inserts a relu at the insertion point and returns its output."""
        return OpBuilder(self)

    @contextlib.contextmanager
    def inserting_before(self, node: Node | None):
        saved, self._insert_before = self._insert_before, node
        try:
            yield
        finally:
            self._insert_before = saved

    @contextlib.contextmanager
    def inserting_after(self, node: Node):
        with self.inserting_before(node.next):
            yield

    # ---- editing -------------------------------------------------------------------------
    def replace_all_uses_with(self, old: Value, new: Value, *, check_type: bool = True) -> None:
        if old is new:
            return
        if check_type and not old.type.matches(new.type):
            raise GraphError(f"cannot replace %{old.name}: {old.type} with %{new.name}: {new.type}")
        if self._journal is not None:
            old_uses = list(old.uses)
            restore = self._restorer(uses=[old, new], outputs=True)

            def undo():
                for node, i in old_uses:
                    node.inputs[i] = old
                restore()
            self._record(undo)
        for node, i in old.uses:
            node.inputs[i] = new
            new.uses.append((node, i))
        old.uses = []
        self.outputs = [new if v is old else v for v in self.outputs]

    def set_input(self, node: Node, index: int, value: Value) -> None:
        old = node.inputs[index]
        if self._journal is not None:
            restore = self._restorer(uses=[old, value])

            def undo():
                node.inputs[index] = old
                restore()
            self._record(undo)
        if old is not None:
            old.uses.remove((node, index))
        node.inputs[index] = value
        value.uses.append((node, index))

    def erase_node(self, node: Node) -> None:
        for v in node.outputs:
            if v.uses or any(o is v for o in self.outputs):
                users = ", ".join(u.label() for u in v.users) or "graph output"
                raise GraphError(f"cannot erase {node.label()}: %{v.name} is still used by {users}")
        if self._journal is not None:
            after, insert_point = node.next, self._insert_before
            restore = self._restorer(uses=node.inputs)

            def undo():
                self._link(node, after)
                self._insert_before = insert_point
                restore()
            self._record(undo)
        for i, v in enumerate(node.inputs):
            if v is not None:
                v.uses.remove((node, i))
        self._unlink(node)

    def move_before(self, node: Node, anchor: Node | None) -> None:
        after = node.next
        self._unlink(node)
        self._link(node, anchor)

        def undo():
            self._unlink(node)
            self._link(node, after)
        self._record(undo)

    def remove_unused_constants(self) -> int:
        used = {v.name for v in self.outputs}
        dead = [n for n, v in self.constants.items() if not v.uses and n not in used]
        if dead and self._journal is not None:
            self._record(self._restorer(constants=True))
        for name in dead:
            del self.constants[name]
            self._names.discard(name)
            self._record(lambda name=name: self._names.add(name))
        return len(dead)

    def remove_dead(self, *, keep_impure: bool = True) -> int:
        """Erase the nodes whose outputs nothing uses (walking backwards, so dead chains go in one
        sweep), then the unused constants; returns the number of nodes erased. Nodes with side
        effects or randomness stay unless ``keep_impure=False``."""
        from graphopt.ir.ops.opaque import is_pure

        outputs = {id(v) for v in self.outputs}
        node, removed = self._tail, 0
        while node is not None:
            prev = node.prev
            if all(not v.uses and id(v) not in outputs for v in node.outputs) \
                    and (not keep_impure or is_pure(node)):
                self.erase_node(node)
                removed += 1
            node = prev
        self.remove_unused_constants()
        return removed

    # ---- checkpoints ---------------------------------------------------------------------
    def checkpoint(self) -> "Checkpoint":
        """Start recording edits so that ``rollback()`` can undo them (see ``Checkpoint``)."""
        if self._journal is None:
            self._journal, self._created = [], []
        checkpoint = Checkpoint(self, len(self._journal), len(self._created), self._next_id)
        self._checkpoints.append(checkpoint)
        return checkpoint

    def _record(self, undo: Callable[[], None]) -> None:
        if self._journal is not None:
            self._journal.append(undo)

    def _restorer(self, *, uses: Sequence[Value | None] = (), outputs: bool = False, constants: bool = False):
        """A function putting back the current use lists of ``uses``, the outputs, the constants."""
        saved_uses = [(v, list(v.uses)) for v in dict.fromkeys(v for v in uses if v is not None)]
        saved_outputs = list(self.outputs) if outputs else None
        saved_constants = dict(self.constants) if constants else None

        def restore():
            for v, u in saved_uses:
                v.uses = list(u)
            if saved_outputs is not None:
                self.outputs = list(saved_outputs)
            if saved_constants is not None:
                self.constants = dict(saved_constants)
        return restore

    # ---- traversal -----------------------------------------------------------------------
    @property
    def nodes(self) -> Iterator[Node]:
        """Nodes in order; safe against erasing the node being visited."""
        node = self._head
        while node is not None:
            nxt = node.next
            yield node
            node = nxt

    def __len__(self) -> int:
        return self._count

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.constants.values()
        for node in self.nodes:
            yield from node.outputs

    def find_nodes(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def topological_sort(self) -> None:
        """Reorder nodes so every value is defined before use (keeps the order where it holds)."""
        order: list[Node] = []
        placed: set[int] = set()
        pending = list(self.nodes)
        producers = {id(n) for n in pending}
        visiting: set[int] = set()

        def visit(node: Node):
            stack = [(node, False)]
            while stack:
                n, expanded = stack.pop()
                if id(n) in placed:
                    continue
                if expanded:
                    visiting.discard(id(n))
                    placed.add(id(n))
                    order.append(n)
                    continue
                if id(n) in visiting:
                    raise GraphError(f"cycle through {n.label()}")
                visiting.add(id(n))
                stack.append((n, True))
                for v in reversed(n.inputs):
                    p = v.producer if v is not None else None
                    if p is not None and id(p) in producers and id(p) not in placed:
                        stack.append((p, False))

        for n in pending:
            visit(n)
        self._record(lambda: self._relink(pending))
        self._relink(order)

    def _relink(self, order: list[Node]) -> None:
        self._head = self._tail = None
        self._count = 0
        for n in order:
            n.prev = n.next = n.graph = None
            self._link(n, None)

    def clone(self) -> "Graph":
        """A structural copy sharing every constant tensor (for rollback and what-if rewrites)."""
        g = Graph(self.name)
        g.meta = dict(self.meta)
        g._names = set(self._names)
        g._next_id = self._next_id
        mapping: dict[int, Value] = {}

        def copy_value(v: Value, producer=None) -> Value:
            c = Value(v.name, v.type, producer, v.index, v.const)
            mapping[id(v)] = c
            return c

        g.inputs = [copy_value(v) for v in self.inputs]
        g.constants = {name: copy_value(v) for name, v in self.constants.items()}
        for n in self.nodes:
            c = Node(n.op, [mapping[id(v)] if v is not None else None for v in n.inputs], dict(n.attrs))
            c.meta = dict(n.meta)
            c.outputs = [copy_value(v, c) for v in n.outputs]
            for i, v in enumerate(c.inputs):
                if v is not None:
                    v.uses.append((c, i))
            g._link(c, None)
        g.outputs = [mapping[id(v)] for v in self.outputs]
        return g

    def to_networkx(self):
        """A networkx MultiDiGraph: one vertex per node (by output label) plus inputs and constants;
        edges carry the value name and input index."""
        import networkx as nx

        nxg = nx.MultiDiGraph()
        for v in self.inputs:
            nxg.add_node("%" + v.name, kind="input", type=str(v.type))
        for v in self.constants.values():
            nxg.add_node("%" + v.name, kind="constant", type=str(v.type))
        key = {}
        for n in self.nodes:
            key[id(n)] = n.label()
            nxg.add_node(key[id(n)], kind="op", op=n.op, node=n)
            for i, v in enumerate(n.inputs):
                if v is None:
                    continue
                src = key[id(v.producer)] if v.producer is not None else "%" + v.name
                nxg.add_edge(src, key[id(n)], value=v.name, index=i)
        return nxg

    def __str__(self) -> str:
        from graphopt.ir.printer import format_graph
        return format_graph(self)

    # ---- linked list ---------------------------------------------------------------------
    def _link(self, node: Node, before: Node | None) -> None:
        if node.graph is not None:
            raise GraphError(f"{node.label()} already belongs to a graph")
        if before is not None and before.graph is not self:
            raise GraphError(f"insertion point {before.label()} is not in this graph")
        node.graph = self
        prev = self._tail if before is None else before.prev
        node.prev, node.next = prev, before
        if prev is not None:
            prev.next = node
        else:
            self._head = node
        if before is not None:
            before.prev = node
        else:
            self._tail = node
        self._count += 1

    def _unlink(self, node: Node) -> None:
        if node.graph is not self:
            raise GraphError(f"{node.label()} is not in this graph")
        if self._insert_before is node:
            self._insert_before = node.next
        if node.prev is not None:
            node.prev.next = node.next
        else:
            self._head = node.next
        if node.next is not None:
            node.next.prev = node.prev
        else:
            self._tail = node.prev
        node.prev = node.next = None
        node.graph = None
        self._count -= 1


class Checkpoint:
    """A point a graph can return to. Between ``graph.checkpoint()`` and ``release()`` the graph
    records its edits (nodes created, erased or moved, inputs rewired, values renamed, inputs,
    outputs and constants changed); ``rollback()`` undoes them and keeps recording. Only edits made
    through ``Graph``'s methods are undone: a pass that sets ``value.type`` or ``node.attrs``
    directly restores them itself. As a context manager it rolls back when the block raises.
    Checkpoints nest; release the inner one first."""

    def __init__(self, graph: Graph, start: int, created: int, next_id: int):
        self.graph = graph
        self._start = start
        self._created_start = created
        self._next_id = next_id

    def created_nodes(self) -> list[Node]:
        """The nodes created since the checkpoint that are still in the graph, in creation order."""
        g = self.graph
        self._check_open()
        return [n for n in g._created[self._created_start:] if n.graph is g]

    def rollback(self) -> None:
        g = self.graph
        self._check_open()
        journal, g._journal = g._journal, None  # undoing records nothing
        try:
            while len(journal) > self._start:
                journal.pop()()
        finally:
            g._journal = journal
        del g._created[self._created_start:]
        g._next_id = self._next_id

    def release(self) -> None:
        """Keep the edits and stop recording for this checkpoint (and any opened after it)."""
        g = self.graph
        self._check_open()
        del g._checkpoints[g._checkpoints.index(self):]
        if not g._checkpoints:
            g._journal, g._created = None, []

    def _check_open(self) -> None:
        if not any(c is self for c in self.graph._checkpoints):
            raise GraphError("this checkpoint was released")

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None:
            self.rollback()
        self.release()


class OpBuilder:
    """Builds ops at a graph's insertion point: ``op.linear(x, w, b)``, ``op("mypkg.swish", x, beta=2.0)``."""

    def __init__(self, graph: Graph):
        self._graph = graph

    def __call__(self, name: str, *inputs, **attrs):
        return self._graph.call(name, *inputs, **attrs)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        get_op(name)
        return lambda *inputs, **attrs: self._graph.call(name, *inputs, **attrs)

    def add_constant(self, tensor, name: str | None = None) -> Value:
        """A constant of the graph (for rewrites that build weights, tables or packed operands)."""
        return self._graph.add_constant(tensor, name)
