"""Common-subexpression elimination: one node per (op, inputs, attributes), one constant per
distinct small tensor.

    %a = reshape(%x, shape=[B,197,6,64]); %b = reshape(%x, shape=[B,197,6,64])
    -> %a used for both
"""
from __future__ import annotations

import hashlib

from graphopt.ir import Graph
from graphopt.ir.ops.opaque import is_pure
from graphopt.ir.printer import format_attr
from graphopt.passes.registry import option, register_pass


@register_pass("cse", tolerance=0.0)
def common_subexpression_elimination(graph: Graph, ctx, *,
                                     max_constant_numel: int = option(4096, "deduplicate equal constants up to this size")) -> None:
    """Merge identical pure nodes and equal small constants."""
    seen_constants: dict[tuple, object] = {}
    for value in list(graph.constants.values()):
        tensor = value.const
        if tensor.numel() > max_constant_numel:
            continue
        key = (tensor.dtype, tuple(tensor.shape), hashlib.sha1(tensor.contiguous().numpy().tobytes()).hexdigest()
               if tensor.dtype.is_floating_point or tensor.dtype.itemsize else None)
        keeper = seen_constants.setdefault(key, value)
        if keeper is not value and _equal(keeper.const, tensor):
            graph.replace_all_uses_with(value, keeper)
            ctx.count("constants_merged")
    graph.remove_unused_constants()

    seen: dict[tuple, object] = {}
    for node in graph.nodes:
        if not is_pure(node):
            continue
        key = (node.op, tuple(id(v) for v in node.inputs), tuple((k, format_attr(v)) for k, v in node.attrs.items()))
        keeper = seen.setdefault(key, node)
        if keeper is node:
            continue
        for old, new in zip(node.outputs, keeper.outputs):
            graph.replace_all_uses_with(old, new)
        graph.erase_node(node)
        ctx.count("nodes_merged")


def _equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all() if a.numel() else True)
