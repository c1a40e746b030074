"""``zero_padded_positions``: the outputs at the positions an attention mask marks as padding become 0.

    %out: [B, T, ...]  ->  where(reshape(ne(%attention_mask, 0), [B, T, 1, ...]), %out, 0)

A BERT-style encoder computes every padded position of a batch, and nobody reads its outputs there:
pooling and losses mask them. Saying so in the graph makes them 0 (as PyTorch's nested-tensor fast path
returns them) and leaves every real position exactly as it was; it also lets a backend skip whatever only
feeds padding: ``cpu_integer`` then computes the real tokens of a padded batch and not its padding
(``backends/cpu_integer_rows.py``). The rewritten graph is still plain standard ops on every backend.
"""
from __future__ import annotations

import torch

from graphopt.ir import Graph
from graphopt.ir.types import dims_equal
from graphopt.passes.registry import PassConfigError, option, register_pass


@register_pass("zero_padded_positions", tolerance=None)
def zero_padded_positions(graph: Graph, ctx, *,
                          mask: str = option("attention_mask", "the graph input that is nonzero at real tokens and 0 "
                                                               "at padding, [batch, tokens]")):
    """Outputs shaped (batch, tokens, ...) like the mask become 0 where the mask is 0, so backends may skip padding."""
    inputs = {v.name: v for v in graph.inputs}
    if mask not in inputs:
        raise PassConfigError(f"pass 'zero_padded_positions': the graph has no input {mask!r} (its inputs: "
                              f"{', '.join(inputs) or 'none'}); name the attention mask with mask=...")
    m = inputs[mask]
    if m.type.rank != 2:
        raise PassConfigError(f"pass 'zero_padded_positions': input {mask!r} is {m.type}, not a [batch, tokens] mask")
    outputs = list(graph.outputs)
    hit = [i for i, v in enumerate(outputs) if v.type.rank >= 2 and all(dims_equal(a, b) for a, b in
                                                                          zip(v.type.shape[:2], m.type.shape))]
    if not hit:
        raise PassConfigError(f"pass 'zero_padded_positions': no output is [batch, tokens, ...] like {mask!r} "
                              f"{m.type}: outputs {', '.join(str(v.type) for v in outputs)}")
    with graph.inserting_before(None):
        keep = graph.op.ne(m, graph.add_constant(torch.zeros((), dtype=m.type.dtype)))
        for i in hit:
            v = outputs[i]
            cond = graph.op.reshape(keep, shape=tuple(m.type.shape) + (1,) * (v.type.rank - 2))
            outputs[i] = graph.op.where(cond, v, graph.add_constant(torch.zeros((), dtype=v.type.dtype)))
    graph.set_outputs(outputs)
    graph.meta["positions_kept_by_mask"] = mask  # outputs agree with the model's only where the mask is nonzero
    ctx.count("outputs_masked", len(hit))
