"""Decompose scaled-dot-product attention into the ops the integer and token passes rewrite.

    sdpa(q, k, v, mask)
    -> matmul(softmax(add(mul(matmul(q, permute(k)), scale), mask)), v)

A boolean mask becomes ``where(mask, scores, -inf)``; ``is_causal`` becomes an explicit
lower-triangular boolean mask built from ``arange``, so symbolic token counts still work.
"""
from __future__ import annotations

import math

import torch

from graphopt.ir import Graph
from graphopt.passes.registry import register_pass


@register_pass("decompose_attention", tolerance=1e-5)
def decompose_attention(graph: Graph, ctx) -> None:
    """Rewrite every sdpa node as matmul / scale / mask / softmax / matmul."""
    for node in graph.find_nodes("sdpa"):
        q, k, v = node.inputs[:3]
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        head = q.type.shape[-1]
        if node.attrs["scale"] is None and not isinstance(head, int):
            raise ValueError(f"{node.label()}: the head size {head} is symbolic, so the default scale "
                             "1/sqrt(head size) is unknown; give sdpa an explicit scale")
        scale = node.attrs["scale"] if node.attrs["scale"] is not None else 1.0 / math.sqrt(head)
        dtype = q.type.dtype
        op = graph.op
        with graph.inserting_before(node):
            rank = k.type.rank
            dims = tuple(range(rank - 2)) + (rank - 1, rank - 2)
            scores = op.mul(op.matmul(q, op.permute(k, dims=dims)), graph.add_constant(torch.tensor(scale, dtype=dtype), "attn_scale"))
            if node.attrs["is_causal"]:
                rows = op.reshape(op.arange(end=q.type.shape[-2]), shape=(q.type.shape[-2], 1))
                cols = op.reshape(op.arange(end=k.type.shape[-2]), shape=(1, k.type.shape[-2]))
                scores = _apply_mask(graph, scores, op.ge(rows, cols), dtype)
            if mask is not None:
                scores = _apply_mask(graph, scores, mask, dtype)
            out = op.matmul(op.softmax(scores, dim=-1), v)
        graph.replace_all_uses_with(node.output, out)
        graph.erase_node(node)
        ctx.count("sdpa_decomposed")


def _apply_mask(graph: Graph, scores, mask, dtype):
    if mask.type.dtype == torch.bool:
        return graph.op.where(mask, scores, graph.add_constant(torch.tensor(float("-inf"), dtype=dtype), "neg_inf"))
    return graph.op.add(scores, mask)
