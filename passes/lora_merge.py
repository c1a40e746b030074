"""``lora_merge``: fold LoRA adapters into the base weight.

    add(base(x), scale * B(A(x)))  ->  base'(x)     with W' = W + scale · B A

where ``base`` is ``linear(x, W, b)`` (W [out, in]) or the ONNX frontend's ``matmul(x, W)`` (W [in,
out], bias as a following ``add``), and A, B are bias-free ``linear``/``matmul`` nodes with
constant weights. The scale is any product of scalar-constant ``mul``/``div`` nodes before or after
B (PEFT writes ``lora_B(lora_A(dropout(x))) * scaling``; dropout is gone in an eval capture).
The adapter's nodes and weights are removed; a base weight shared with another node is copied,
never changed in place. Stacked adapters on one base merge one after another.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.ir import Graph, Node, Value
from graphopt.passes.registry import register_pass

IDENTITY = {"clone", "contiguous", "alias"}


@dataclass
class _Proj:
    node: Node
    kind: str          # linear | matmul
    weight: Value
    input: Value

    def x_form(self) -> torch.Tensor:
        """The weight as the matrix M with y = x @ M, in float64."""
        w = self.weight.const.double()
        return w.t() if self.kind == "linear" else w


def _projection(node: Node | None, allow_bias: bool) -> _Proj | None:
    if node is None:
        return None
    if node.op == "linear" and node.inputs[1].is_constant and node.inputs[1].type.rank == 2:
        if not allow_bias and len(node.inputs) > 2 and node.inputs[2] is not None:
            return None
        return _Proj(node, "linear", node.inputs[1], node.inputs[0])
    if node.op == "matmul" and node.inputs[1].is_constant and node.inputs[1].type.rank == 2 \
            and not node.inputs[0].is_constant:
        return _Proj(node, "matmul", node.inputs[1], node.inputs[0])
    return None


def _base(value: Value) -> _Proj | None:
    node = value.producer
    proj = _projection(node, allow_bias=True)
    if proj is not None:
        return proj
    if node is not None and node.op == "add":  # matmul + bias add (ONNX frontend), either order
        for i in (0, 1):
            bias, inner = node.inputs[i], node.inputs[1 - i]
            if bias.is_constant and bias.type.rank == 1 and inner.producer is not None \
                    and len(inner.uses) == 1 and inner.producer.op == "matmul":
                return _projection(inner.producer, allow_bias=False)
    return None


def _scalar(value: Value) -> float | None:
    return float(value.const.reshape(()).item()) if value.is_constant and value.const.numel() == 1 else None


def _strip_identity(value: Value) -> Value:
    while value.producer is not None and value.producer.op in IDENTITY:
        value = value.producer.inputs[0]
    return value


def _adapter(value: Value, x: Value):
    """(A, B, scale, nodes) when ``value`` is scale * B(A(x)) with private intermediates."""
    nodes: list[Node] = []
    scale = 1.0
    projections: list[_Proj] = []
    v = value
    if value.sole_user is None:
        return None
    while True:
        node = v.producer
        if node is None or (nodes and v.sole_user is None):
            return None
        if node.op in ("mul", "div"):
            if node.op == "div":
                s, rest = _scalar(node.inputs[1]), node.inputs[0]
                s = None if s in (None, 0.0) else 1.0 / s
            elif _scalar(node.inputs[1]) is not None:
                s, rest = _scalar(node.inputs[1]), node.inputs[0]
            else:
                s, rest = _scalar(node.inputs[0]), node.inputs[1]
            if s is None:
                return None
            scale *= s
            nodes.append(node)
            v = rest
            continue
        proj = _projection(node, allow_bias=False)
        if proj is None:
            return None
        nodes.append(node)
        projections.append(proj)
        if len(projections) == 2:
            break
        v = proj.input
    b, a = projections
    if _strip_identity(a.input) is not _strip_identity(x):
        return None
    return a, b, scale, nodes


def merge_adapters(graph: Graph, ctx=None) -> int:
    merged = 0
    for node in list(graph.nodes):
        if node.graph is not graph or node.op != "add":
            continue
        for i in (0, 1):
            base = _base(node.inputs[i])
            if base is None:
                continue
            found = _adapter(node.inputs[1 - i], base.input)
            if found is None:
                continue
            a, b, scale, nodes = found
            delta = scale * (a.x_form() @ b.x_form())          # [in, out] in x @ M form
            w = base.weight.const
            if tuple(delta.shape) != (tuple(w.shape)[::-1] if base.kind == "linear" else tuple(w.shape)):
                continue
            new_w = (w.double() + (delta.t() if base.kind == "linear" else delta)).to(w.dtype)
            graph.set_input(base.node, 1, graph.add_constant(new_w, f"{base.weight.name}.merged"))
            graph.replace_all_uses_with(node.output, node.inputs[i])
            graph.erase_node(node)
            for n in nodes:  # outermost first: each is unused once the one after it is gone
                if not any(v.uses for v in n.outputs):
                    graph.erase_node(n)
            rank = a.weight.type.shape[0] if a.kind == "linear" else a.weight.type.shape[1]
            if ctx is not None:
                ctx.note(f"merged adapter {a.weight.name} / {b.weight.name} (rank {rank}, scale {scale:g}) into "
                         f"{base.weight.name}")
            merged += 1
            break
    graph.remove_unused_constants()
    return merged


@register_pass("lora_merge", tolerance=1e-4)
def lora_merge(graph, ctx):
    """Fold LoRA adapters (x -> A -> B -> scale -> add next to a base linear) into the base weight."""
    total = 0
    while True:  # stacked adapters: the second merges once the first is gone
        n = merge_adapters(graph, ctx)
        total += n
        if not n:
            break
    ctx.count("merged", total)
    if not total:
        ctx.note("no LoRA adapter found (looked for add(base(x), scale * B(A(x))) with constant weights)")
