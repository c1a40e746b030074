"""A pruned layer replaced by ``sparse_linear`` (CSR or 1x4 blocks), once ``ir/sparse_decision.py`` has
measured that the sparse kernel beats the dense GEMM at that layer's shape and sparsity."""
from __future__ import annotations

import torch

from graphopt.ir import Graph
from graphopt.ir.ops.sparse import OP, to_block1x4, to_csr
from graphopt.passes.low_rank_layers import Layer


def substitute(graph: Graph, layer: Layer, weight: torch.Tensor, fmt: str) -> None:
    """Replace the (linear) layer by ``sparse_linear`` with ``weight`` ([out, in], pruned) stored sparse."""
    node = layer.node
    m, n = weight.shape
    row_ptr, col, values = (to_csr if fmt == "csr" else to_block1x4)(weight.contiguous())
    base = layer.weight.name
    with graph.inserting_before(node):
        inputs = [node.inputs[0], graph.add_constant(row_ptr, f"{base}.row_ptr"), graph.add_constant(col, f"{base}.col"),
                  graph.add_constant(values, f"{base}.values")]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            inputs.append(node.inputs[2])
        new = graph.create_node(OP, inputs, {"format": fmt, "out_features": int(m), "in_features": int(n)},
                                meta={**node.meta, "sparse": {"layer": layer.name, "format": fmt}})
    graph.replace_all_uses_with(node.output, new.output)
    graph.erase_node(node)


__all__ = ["Decision", "TimingSource", "decide", "default_cache", "substitute"]
