"""Dead-code elimination: remove nodes whose outputs nothing uses, and unused constants.

    %5 = relu(%4)      # %5 unused
    -> (removed)
"""
from __future__ import annotations

from graphopt.ir import Graph
from graphopt.ir.ops.opaque import is_pure
from graphopt.passes.registry import register_pass


@register_pass("dce", tolerance=0.0)
def dead_code_elimination(graph: Graph, ctx) -> None:
    """Remove nodes whose outputs are unused (walking backwards, so chains go at once) and unused constants."""
    node = graph._tail
    removed = 0
    while node is not None:
        prev = node.prev
        if is_pure(node) and all(not v.uses for v in node.outputs) \
                and not any(v is o for v in node.outputs for o in graph.outputs):
            graph.erase_node(node)
            removed += 1
        node = prev
    ctx.count("nodes_removed", removed)
    ctx.count("constants_removed", graph.remove_unused_constants())
