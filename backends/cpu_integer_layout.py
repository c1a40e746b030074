"""Attention's output written in the layout its consumer reads: ``cpu.int_bmm -> permute`` becomes one
``cpu.int_bmm`` with ``out_perm``, so probabilities x V ([B, H, T, D]) land as [B, T, H, D] and the reshape to
[B, T, H D] after them is a view, not a copy (the kernel writes with strides; on ONNX Runtime the Transpose
node goes too)::

    y = cpu.int_bmm(p, v, ...)                 y = cpu.int_bmm(p, v, ..., out_perm=(0, 2, 1, 3))
    z = permute(y, dims=(0, 2, 1, 3))   ->     z = y
"""
from __future__ import annotations

from graphopt.backends.cpu_integer_rows import _input
from graphopt.ir import Graph, Node


def _foldable(node: Node, outputs: set[int]) -> Node | None:
    """The permute that node's output alone feeds, when the kernel can write that layout itself."""
    if node.op != "cpu.int_bmm" or node.attrs.get("out_perm") or _input(node, "pow2")[1] is not None:
        return None
    y = node.outputs[0]
    users = y.users
    if y.type.rank != 4 or id(y) in outputs or len(users) != 1 or users[0].op != "permute":
        return None
    dims = tuple(d % 4 for d in users[0].attrs["dims"])
    return users[0] if dims[-1] == 3 and users[0].inputs[0] is y else None


def fold_output_permutes(graph: Graph) -> int:
    """Fold each attention output's permute into its ``cpu.int_bmm`` (in place); returns how many."""
    outputs = {id(v) for v in graph.outputs}
    folded = 0
    for node in list(graph.nodes):
        permute = _foldable(node, outputs)
        if permute is None:
            continue
        attrs = dict(node.attrs, out_perm=tuple(d % 4 for d in permute.attrs["dims"]))
        with graph.inserting_before(node):
            new = graph.create_node(node.op, list(node.inputs), attrs, meta=dict(node.meta))
        graph.replace_all_uses_with(permute.outputs[0], new.outputs[0])
        graph.erase_node(permute)
        graph.erase_node(node)
        folded += 1
    return folded
