"""Dead-code elimination: remove nodes whose outputs nothing uses, and unused constants.

    %5 = relu(%4)      # %5 unused
    -> (removed)
"""
from __future__ import annotations

from graphopt.ir import Graph
from graphopt.passes.registry import register_pass


@register_pass("dce", tolerance=0.0)
def dead_code_elimination(graph: Graph, ctx) -> None:
    """Remove nodes whose outputs are unused (walking backwards, so chains go at once) and unused constants."""
    constants = len(graph.constants)
    ctx.count("nodes_removed", graph.remove_dead())
    ctx.count("constants_removed", constants - len(graph.constants))
