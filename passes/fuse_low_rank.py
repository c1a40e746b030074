"""``fuse_low_rank``: fuse a factorised MLP into one ``low_rank_mlp`` node.

    B2(A2(act(B1(A1(x)) + b1))) + b2  ->  low_rank_mlp(x, A1, B1, b1, A2, B2, b2, activation=act)
    B2(A2(B1(A1(x)) + b1)) + b2       ->  low_rank_mlp(..., activation="none")   (consecutive pairs)

A factor pair is a factorised projection (``graphopt.ir.projection``): ``linear(linear(x, A), B, b)``,
or the same with captured ``matmul``s and a bias ``add``, whose inner width r is below both outer
widths. The fused op
never materialises the full-width hidden layer (see ``graphopt.ir.ops.low_rank``). Intermediate
values used outside the chain block the fusion (reported, with the reason).

GELUs written out with erf or tanh (ONNX exports below opset 20) are folded into ``gelu`` first by
the ``fuse_gelu`` rule set, so graphs from the ONNX frontend fuse like captured ones.
"""
from __future__ import annotations

import torch

from graphopt.ir import Graph, Value
from graphopt.ir.ops.low_rank import OP
from graphopt.ir.projection import Projection, projection_producing
from graphopt.passes.fuse_gelu import FUSE_GELU
from graphopt.passes.registry import option, register_pass

ACTIVATION_OPS = {"relu": "relu", "silu": "silu"}


def factor_pair(value: Value) -> Projection | None:
    """The factorised projection producing ``value``, with a constant bias (or none)."""
    pair = projection_producing(value)
    if pair is None or pair.factors is None or (pair.bias is not None and not pair.bias.is_constant):
        return None
    return pair


def _activation(value: Value):
    """(name, input value, node) when ``value`` is an activation the fused op knows."""
    node = value.producer
    if node is None:
        return None
    if node.op == "gelu":
        return ("gelu" if node.attrs["approximate"] == "none" else "gelu_tanh"), node.inputs[0], node
    if node.op in ACTIVATION_OPS:
        return ACTIVATION_OPS[node.op], node.inputs[0], node
    return None


def _bias_tensor(pair: Projection, dtype) -> torch.Tensor:
    return pair.bias.const if pair.bias is not None else torch.zeros(pair.out_features, dtype=dtype)


def fuse(graph: Graph, tile: int, ctx=None) -> int:
    fused = 0
    for node in list(graph.nodes):
        if node.graph is not graph:
            continue
        if node.op not in ("linear", "add", "matmul"):
            continue
        outer = factor_pair(node.output)
        if outer is None:
            continue
        hidden = outer.input
        act = _activation(hidden)
        if act is not None:
            name, pre, act_node = act
            if hidden.sole_user is None:
                if ctx is not None:
                    ctx.count("skipped_hidden_used_elsewhere")
                continue
        else:
            name, pre, act_node = "none", hidden, None
        inner = factor_pair(pre)
        if inner is None:
            continue
        if pre.sole_user is None:
            if ctx is not None:
                ctx.count("skipped_hidden_used_elsewhere")
            continue
        dtype = outer.weight.const.dtype
        (a1, b1), (a2, b2) = ((p.matrix for p in pair.factors) for pair in (inner, outer))
        with graph.inserting_before(node):
            consts = [graph.add_constant(t.contiguous(), f"lr_mlp.{k}") for k, t in
                      (("a1", a1), ("b1", b1), ("bias1", _bias_tensor(inner, dtype)),
                       ("a2", a2), ("b2", b2), ("bias2", _bias_tensor(outer, dtype)))]
            new = graph.create_node(OP, [inner.input] + consts, {"activation": name, "tile": tile})
        graph.replace_all_uses_with(node.output, new.output)
        dead = outer.nodes[::-1] + ([act_node] if act_node is not None else []) + inner.nodes[::-1]
        for n in dead:
            if n.graph is graph and not any(v.uses for v in n.outputs):
                graph.erase_node(n)
        if ctx is not None:
            ctx.note(f"fused {name} MLP {inner.input.type} -> ranks {inner.factors[0].out_features}/"
                     f"{outer.factors[0].out_features}, hidden {inner.out_features} -> {new.output.type}")
        fused += 1
    graph.remove_unused_constants()
    return fused


@register_pass("fuse_low_rank", tolerance=1e-4)
def fuse_low_rank(graph, ctx, *, tile: int = option(256, "hidden columns the fused op computes at a time")):
    """Fuse factorised MLPs / consecutive factor pairs into low_rank_mlp (no full-width intermediate)."""
    if tile < 1:
        raise ValueError(f"option tile={tile} must be a positive integer")
    for rule, fired in FUSE_GELU.apply(graph).items():
        if fired:
            ctx.count(rule, fired)
    n = fuse(graph, tile, ctx)
    ctx.count("fused", n)
    if not n:
        ctx.note("no factorised MLP found: run low_rank first (looked for B2(A2(act(B1(A1(x)))))")
