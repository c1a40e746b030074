"""The verifier: the invariants every pass must leave intact.

Single definition, defined before use, use lists that agree with node inputs (no dangling
uses of erased nodes, no orphan constants), and every node's output types equal to what its
op's type rule infers from its inputs. Errors name the node.

Linear in the graph: a value's use list is compared with the node inputs by counting (every
listed use is a real input slot, none twice, as many as the slots that read the value), never
by searching the list once per slot (one constant read by 100,000 nodes).
"""
from __future__ import annotations

from graphopt.ir.graph import Graph, Node
from graphopt.ir.opdef import OpError, get_op


class VerificationError(Exception):
    def __init__(self, message: str, node: Node | None = None):
        self.node = node
        super().__init__(f"node {node.label()}: {message}" if node is not None else message)


def verify(graph: Graph) -> None:
    defined: set[int] = set()
    names: dict[str, object] = {}

    def define(value, where):
        if value.name in names and names[value.name] is not value:
            raise VerificationError(f"value name %{value.name} is defined twice", where)
        names[value.name] = value
        defined.add(id(value))

    for v in graph.inputs:
        if v.producer is not None or v.is_constant:
            raise VerificationError(f"graph input %{v.name} has a producer or a constant tensor")
        define(v, None)
    for name, v in graph.constants.items():
        if v.const is None or v.name != name:
            raise VerificationError(f"constant %{name} has no tensor or a mismatched name")
        define(v, None)

    in_graph: set[int] = set()
    reads: dict[int, int] = {}  # id(value) -> input slots that read it
    count = 0
    for node in graph.nodes:
        count += 1
        in_graph.add(id(node))
        if node.graph is not graph:
            raise VerificationError("node is linked into the graph but belongs to another", node)
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if id(v) not in defined:
                if v.producer is not None and v.producer.graph is not graph:
                    raise VerificationError(f"input {i} %{v.name} is produced by {v.producer.label()}, which is not in the graph", node)
                if v.is_constant:
                    raise VerificationError(f"input {i} %{v.name} is an orphan constant (not in graph.constants)", node)
                raise VerificationError(f"input {i} %{v.name} is used before it is defined", node)
            reads[id(v)] = reads.get(id(v), 0) + 1
        _check_types(node)
        for j, out in enumerate(node.outputs):
            if out.producer is not node or out.index != j:
                raise VerificationError(f"output {j} %{out.name} does not point back to its node", node)
            define(out, node)
    if count != len(graph):
        raise VerificationError(f"node count {len(graph)} disagrees with the {count} nodes linked")

    for value in list(graph.inputs) + list(graph.constants.values()) + [o for n in graph.nodes for o in n.outputs]:
        listed = set()
        for user, i in value.uses:
            if id(user) not in in_graph:
                raise VerificationError(f"%{value.name} lists a use by {user.label()}, which is not in the graph (dangling use)")
            if i >= len(user.inputs) or user.inputs[i] is not value:
                raise VerificationError(f"%{value.name} lists a use as input {i} that the node does not have", user)
            if (id(user), i) in listed:
                raise VerificationError(f"%{value.name} lists its use as input {i} twice", user)
            listed.add((id(user), i))
        if len(listed) != reads.get(id(value), 0):
            _missing_use(graph, value, listed)
    for v in graph.outputs:
        if id(v) not in defined:
            raise VerificationError(f"graph output %{v.name} is not defined in the graph")


def _missing_use(graph: Graph, value, listed: set) -> None:
    """Name the input slot that reads ``value`` but is missing from its use list (the error path only)."""
    for node in graph.nodes:
        for i, v in enumerate(node.inputs):
            if v is value and (id(node), i) not in listed:
                raise VerificationError(f"input {i} %{v.name} does not list this node among its uses", node)


def _check_types(node: Node) -> None:
    try:
        schema = get_op(node.op)
        problem = schema.check_arity(len(node.inputs))
        if problem:
            raise OpError(problem)
        attrs = schema.complete_attrs(node.attrs)
        expected = schema.infer_types([v.type if v is not None else None for v in node.inputs], attrs)
    except OpError as e:
        raise VerificationError(str(e), node) from None
    if len(expected) != len(node.outputs):
        raise VerificationError(f"op rule gives {len(expected)} outputs, node has {len(node.outputs)}", node)
    for out, t in zip(node.outputs, expected):
        if not out.type.matches(t):
            raise VerificationError(f"output %{out.name} is typed {out.type} but {node.op} gives {t}", node)
