"""``lora_merge``: fold LoRA adapters into the base weight.

    add(base(x), scale * B(A(x)))  ->  base'(x)     with W' = W + scale · B A

where ``base``, A and B are projections (``graphopt.ir.projection``: ``linear``, or a captured
``matmul`` with a constant weight, its bias add included) and A, B have no bias. The scale is any
product of scalar-constant ``mul``/``div`` nodes before or after B (PEFT writes
``lora_B(lora_A(dropout(x))) * scaling``; dropout is gone in an eval capture). The adapter's nodes
and weights are removed; a base weight shared with another node is copied, never changed in place.
Stacked adapters on one base merge one after another.
"""
from __future__ import annotations

from graphopt.ir import Graph, Node, Value
from graphopt.ir.projection import Projection, projection_producing
from graphopt.passes.registry import register_pass

IDENTITY = {"clone", "contiguous", "alias"}


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
    projections: list[Projection] = []
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
        proj = projection_producing(v, factored=False)
        if proj is None or proj.bias is not None:
            return None
        nodes.extend(reversed(proj.nodes))
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
            base = projection_producing(node.inputs[i], factored=False)
            if base is None:
                continue
            found = _adapter(node.inputs[1 - i], base.input)
            if found is None:
                continue
            a, b, scale, nodes = found
            delta = scale * (b.matrix.double() @ a.matrix.double())  # [out, in]
            if tuple(delta.shape) != (base.out_features, base.in_features):
                continue
            base.set_matrix(graph, base.matrix.double() + delta, f"{base.weight.name}.merged")
            graph.replace_all_uses_with(node.output, node.inputs[i])
            graph.erase_node(node)
            for n in nodes:  # outermost first: each is unused once the one after it is gone
                if not any(v.uses for v in n.outputs):
                    graph.erase_node(n)
            if ctx is not None:
                ctx.note(f"merged adapter {a.weight.name} / {b.weight.name} (rank {a.out_features}, scale {scale:g}) into "
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
