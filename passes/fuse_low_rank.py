"""``fuse_low_rank``: fuse a factorised MLP into one ``low_rank_mlp`` node.

    B2(A2(act(B1(A1(x)) + b1))) + b2  ->  low_rank_mlp(x, A1, B1, b1, A2, B2, b2, activation=act)
    B2(A2(B1(A1(x)) + b1)) + b2       ->  low_rank_mlp(..., activation="none")   (consecutive pairs)

A factor pair is ``linear(linear(x, A), B, b)`` or the ONNX form ``matmul(matmul(x, Aᵀ), Bᵀ)`` (+
bias ``add``) with constant weights whose inner width r is below both outer widths. The fused op
never materialises the full-width hidden layer (see ``graphopt.ir.ops.low_rank``). Intermediate
values used outside the chain block the fusion (reported, with the reason).

GELUs written out with erf or tanh (ONNX exports below opset 20) are folded into ``gelu`` first by
the ``fuse_gelu`` rule set, so graphs from the ONNX frontend fuse like captured ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.ir import Graph, Node, Value
from graphopt.ir.ops.low_rank import OP
from graphopt.passes.fuse_gelu import FUSE_GELU
from graphopt.passes.registry import option, register_pass

ACTIVATION_OPS = {"relu": "relu", "silu": "silu"}


@dataclass
class _Pair:
    x: Value
    a: torch.Tensor          # [r, n]
    b: torch.Tensor          # [m, r]
    bias: Value | None
    nodes: list[Node]
    output: Value

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def _const2d(v: Value | None) -> bool:
    return v is not None and v.is_constant and v.type.rank == 2


def _proj(node: Node | None):
    """(input, W as [out, in], bias Value or None) of a linear / constant matmul node."""
    if node is None:
        return None
    if node.op == "linear" and _const2d(node.inputs[1]):
        return node.inputs[0], node.inputs[1].const, node.inputs[2] if len(node.inputs) > 2 else None
    if node.op == "matmul" and _const2d(node.inputs[1]) and not node.inputs[0].is_constant:
        return node.inputs[0], node.inputs[1].const.t(), None
    return None


def factor_pair(value: Value) -> _Pair | None:
    nodes: list[Node] = []
    node = value.producer
    bias = None
    if node is not None and node.op == "add":  # matmul + bias
        for i in (0, 1):
            c, inner = node.inputs[i], node.inputs[1 - i]
            if c.is_constant and c.type.rank == 1 and inner.producer is not None and inner.producer.op == "matmul" \
                    and inner.sole_user is not None:
                nodes.append(node)
                bias, node = c, inner.producer
                break
    second = _proj(node)
    if second is None or (bias is not None and second[2] is not None):
        return None
    mid, b, own_bias = second
    bias = bias if bias is not None else own_bias
    nodes.append(node)
    first = _proj(mid.producer)
    if first is None or first[2] is not None or mid.sole_user is None:
        return None
    x, a, _ = first
    nodes.append(mid.producer)
    r, n = a.shape
    m = b.shape[0]
    if not (r < n and r < m):
        return None
    return _Pair(x, a, b, bias, nodes, value)


def _feeds_bias_add(value: Value) -> bool:
    """``value`` is a matmul output whose only use adds a constant bias: fuse from that add instead."""
    if value.sole_user is None:
        return False
    user = value.uses[0][0]
    other = user.inputs[1 - value.uses[0][1]] if user.op == "add" and len(user.inputs) == 2 else None
    return other is not None and other.is_constant and other.type.rank == 1


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


def _bias_tensor(pair: _Pair, dtype) -> torch.Tensor:
    return pair.bias.const if pair.bias is not None else torch.zeros(pair.b.shape[0], dtype=dtype)


def fuse(graph: Graph, tile: int, ctx=None) -> int:
    fused = 0
    for node in list(graph.nodes):
        if node.graph is not graph:
            continue
        if node.op not in ("linear", "add", "matmul") or (node.op == "matmul" and _feeds_bias_add(node.output)):
            continue
        outer = factor_pair(node.output)
        if outer is None:
            continue
        hidden = outer.x
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
        dtype = outer.b.dtype
        with graph.inserting_before(node):
            consts = [graph.add_constant(t.contiguous(), f"lr_mlp.{k}") for k, t in
                      (("a1", inner.a), ("b1", inner.b), ("bias1", _bias_tensor(inner, dtype)),
                       ("a2", outer.a), ("b2", outer.b), ("bias2", _bias_tensor(outer, dtype)))]
            new = graph.create_node(OP, [inner.x] + consts, {"activation": name, "tile": tile})
        graph.replace_all_uses_with(node.output, new.output)
        dead = outer.nodes + ([act_node] if act_node is not None else []) + inner.nodes
        for n in dead:
            if n.graph is graph and not any(v.uses for v in n.outputs):
                graph.erase_node(n)
        if ctx is not None:
            ctx.note(f"fused {name} MLP {inner.x.type} -> ranks {inner.rank}/{outer.rank}, hidden "
                     f"{inner.b.shape[0]} -> {new.output.type}")
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
