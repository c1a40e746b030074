"""Constant folding: evaluate nodes whose inputs are all constants, once, at compile time.

    %t = permute(%w, dims=[1,0])      (w constant)
    -> %t = constant

Nodes whose attributes hold symbolic dims, impure (opaque) nodes, and results that would be
much larger than their inputs (an ``expand`` of a bias to the batch) stay in the graph. So do
folds whose work is not bounded by their sizes: ONNX control flow (a ``Loop`` whose trip count is
a constant 2**62 runs forever) and model-local functions, and any node the cost model prices
above ``max_flops``, and a node that fails on its constants (it would fail at run time too).
"""
from __future__ import annotations

import sympy
import torch

from graphopt.ir import Graph, Node, get_op
from graphopt.ir.cost import node_cost
from graphopt.ir.ops.opaque import is_pure
from graphopt.passes.registry import option, register_pass


@register_pass("constant_folding")
def constant_folding(graph: Graph, ctx, *,
                     max_numel: int = option(1 << 22, "never create a constant with more elements than this"),
                     max_growth: float = option(1.0, "skip a fold whose result has more than this many times "
                                                     "the elements of its inputs (unless it is tiny)"),
                     max_flops: int = option(1 << 32, "never run a fold that costs more than this many FLOPs")) -> None:
    """Evaluate nodes whose inputs are all constants and replace them by the result."""
    for node in graph.nodes:
        if not _foldable(node):
            continue
        inputs = [v.const for v in node.inputs if v is not None]
        out_numel = sum(_static_numel(v.type) for v in node.outputs)
        in_numel = sum(t.numel() for t in inputs)
        if out_numel > max_numel or (out_numel > 4096 and out_numel > max_growth * max(in_numel, 1)):
            ctx.count("skipped_too_large")
            continue
        if _unbounded_work(node, max_flops):
            ctx.count("skipped_too_much_work")
            continue
        try:
            with torch.no_grad():
                result = get_op(node.op).reference(*[v.const if v is not None else None for v in node.inputs],
                                                   **node.attrs)
        except Exception as e:  # the node fails on its own constants: it fails at run time too, leave it there
            ctx.note(f"{node.label()} not folded: evaluating it fails: {' '.join(str(e).split())[:200]}")
            ctx.count("skipped_evaluation_fails")
            continue
        results = result if isinstance(result, tuple) else (result,)
        for out, tensor in zip(node.outputs, results):
            const = graph.add_constant(tensor.contiguous(), "folded")
            graph.replace_all_uses_with(out, const)
        graph.erase_node(node)
        ctx.count("folded")
    graph.remove_unused_constants()


def _foldable(node: Node) -> bool:
    if not is_pure(node) or any(v is not None and not v.is_constant for v in node.inputs):
        return False
    if any(not v.type.is_static for v in node.outputs):
        return False
    return not any(_symbolic(a) for a in node.attrs.values())


def _unbounded_work(node: Node, max_flops: int) -> bool:
    """Work not bounded by the sizes of inputs and outputs (subgraphs, functions), or priced over the cap."""
    if node.op == "onnx_opaque":
        attrs = node.attrs["attributes"]
        has_subgraph = attrs is not None and any(p.type in (p.GRAPH, p.GRAPHS) for p in attrs.protos())
        return has_subgraph or bool(node.attrs["functions"])
    cost = node_cost(node)
    return cost is not None and cost.flops.is_Number and cost.flops > max_flops


def _symbolic(value) -> bool:
    if isinstance(value, sympy.Expr):
        return not value.is_Integer
    if isinstance(value, (list, tuple)):
        return any(_symbolic(v) for v in value)
    return False


def _static_numel(t) -> int:
    return int(t.numel())
