"""Symbolic cost model: FLOPs, bytes read/written and parameter bytes per node, as sympy
expressions of the graph's symbolic dims (``batch``, token counts).

Conventions: a multiply-add is 2 FLOPs; elementwise ops cost 1 FLOP per output element;
softmax 5 per element (max, subtract, exp, sum, divide); layer_norm 8 per element; reductions 1 per
input element; data movement 0 FLOPs. Views (reshape, expand) move no bytes. Opaque nodes have
unknown cost: they count 0 and are listed, never guessed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import sympy

from graphopt.ir.graph import Graph, Node
from graphopt.ir.opdef import get_op
from graphopt.ir.registry import Registry
from graphopt.ir.types import Dim, TensorType

COSTS: Registry[Callable[[Node], sympy.Expr]] = Registry("cost formula", group="graphopt.costs")
VIEWS = {"reshape", "expand"}


def register_cost(*ops: str, replace: bool = False):
    """Register the FLOP formula of ops: ``fn(node) -> sympy expression``."""
    return COSTS.decorator(*ops, replace=replace)


def register_elementwise_cost(flops_per_element: int, *ops: str) -> None:
    """Ops whose FLOPs are a fixed count per element of their first output."""
    register_cost(*ops)(lambda node: flops_per_element * _n(node.outputs[0].type))


def _n(t: TensorType) -> sympy.Expr:
    return sympy.sympify(t.numel())


def _bytes(t: TensorType) -> sympy.Expr:
    return _n(t) * t.dtype.itemsize


@register_cost("linear")
def _linear(node):
    x, w = node.inputs[0].type, node.inputs[1].type
    rows = _n(x) / sympy.sympify(x.shape[-1])
    out, inner = sympy.sympify(w.shape[0]), sympy.sympify(w.shape[1])
    bias = rows * out if len(node.inputs) > 2 and node.inputs[2] is not None else 0
    return 2 * rows * inner * out + bias


@register_cost("matmul")
def _matmul(node):
    a = node.inputs[0].type
    return 2 * _n(node.output.type) * sympy.sympify(a.shape[-1])


@register_cost("conv2d")
def _conv2d(node):
    w = node.inputs[1].type
    per_output = sympy.sympify(w.shape[1]) * w.shape[2] * w.shape[3]
    bias = _n(node.output.type) if len(node.inputs) > 2 and node.inputs[2] is not None else 0
    return 2 * _n(node.output.type) * per_output + bias


@register_cost("sdpa")
def _sdpa(node):
    q, k, v = (i.type for i in node.inputs[:3])
    scores = _n(q) / sympy.sympify(q.shape[-1]) * sympy.sympify(k.shape[-2])
    mask = scores if len(node.inputs) > 3 or node.attrs["is_causal"] else 0
    return 2 * scores * sympy.sympify(q.shape[-1]) + 2 * scores * sympy.sympify(v.shape[-1]) + scores + 5 * scores + mask


register_elementwise_cost(5, "softmax")
register_elementwise_cost(8, "layer_norm")


def _flops(node: Node) -> sympy.Expr | None:
    formula = COSTS.find(node.op)
    if formula is not None:
        return sympy.sympify(formula(node))
    tags = get_op(node.op).tags
    if "elementwise" in tags:
        return sum((_n(o.type) for o in node.outputs), sympy.Integer(0))
    if "reduce" in tags:
        return _n(node.inputs[0].type)
    if "layout" in tags or node.op in ("embedding", "gather", "index_select", "arange", "full"):
        return sympy.Integer(0)
    return None


@dataclass
class Cost:
    flops: sympy.Expr = sympy.Integer(0)
    bytes_read: sympy.Expr = sympy.Integer(0)
    bytes_written: sympy.Expr = sympy.Integer(0)
    param_bytes: sympy.Expr = sympy.Integer(0)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes_read + other.bytes_read,
                    self.bytes_written + other.bytes_written, self.param_bytes + other.param_bytes)

    def at(self, **dims: int) -> dict[str, int]:
        """The figures for concrete dims, e.g. ``cost.at(batch=8)``."""
        subs = {sympy.Symbol(k, integer=True, positive=True): v for k, v in dims.items()}
        out = {}
        for name in ("flops", "bytes_read", "bytes_written", "param_bytes"):
            value = sympy.sympify(getattr(self, name)).subs(subs)
            if value.free_symbols:
                raise ValueError(f"{name} still depends on {sorted(map(str, value.free_symbols))}; give those dims")
            out[name] = int(sympy.floor(value))
        return out


def node_cost(node: Node) -> Cost | None:
    """None when the op's cost is unknown (opaque, or an op with no registered formula)."""
    flops = _flops(node)
    if flops is None:
        return None
    params = [v for v in node.inputs if v is not None and v.is_constant]
    acts = [v for v in node.inputs if v is not None and not v.is_constant]
    param_bytes = sum((_bytes(v.type) for v in params), sympy.Integer(0))
    if node.op in VIEWS:
        return Cost(flops, sympy.Integer(0), sympy.Integer(0), param_bytes)
    read = sum((_bytes(v.type) for v in acts), sympy.Integer(0)) + param_bytes
    written = sum((_bytes(v.type) for v in node.outputs), sympy.Integer(0))
    return Cost(flops, read, written, param_bytes)


@dataclass
class GraphCost:
    total: Cost
    per_node: dict[str, Cost] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    parameters: int = 0
    parameter_bytes: int = 0

    def at(self, **dims: int) -> dict[str, int]:
        return {**self.total.at(**dims), "parameters": self.parameters}


def graph_cost(graph: Graph) -> GraphCost:
    flops, read, written, pbytes = [], [], [], []
    per_node, unknown = {}, []
    for node in graph.nodes:
        cost = node_cost(node)
        if cost is None:
            unknown.append(node.label())
            continue
        per_node[node.label()] = cost
        flops.append(cost.flops)
        read.append(cost.bytes_read)
        written.append(cost.bytes_written)
        pbytes.append(cost.param_bytes)
    total = Cost(*(sympy.expand(sympy.Add(*terms)) if terms else sympy.Integer(0)
                   for terms in (flops, read, written, pbytes)))
    count, nbytes = parameter_totals(graph)
    return GraphCost(total, per_node, unknown, count, nbytes)


def parameter_totals(graph: Graph) -> tuple[int, int]:
    """Distinct floating-point constants with more than one element that some node reads
    (scalars, integer tensors and the buffers a frontend marked, e.g. rotary tables, are not)."""
    seen: set[int] = set()
    buffers = set(graph.meta.get("buffers", ()))
    count = nbytes = 0
    for value in graph.constants.values():
        t = value.const
        if not value.uses or value.name in buffers or not t.dtype.is_floating_point or t.numel() <= 1:
            continue
        key = id(t.untyped_storage()) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        count += t.numel()
        nbytes += t.numel() * t.element_size()
    return count, nbytes


def compare(before: Graph, after: Graph, **dims: int) -> dict[str, dict[str, float]]:
    """Before/after totals and ratio (after / before) at the given dims."""
    b, a = graph_cost(before).at(**dims), graph_cost(after).at(**dims)
    return {k: {"before": b[k], "after": a[k], "ratio": (a[k] / b[k]) if b[k] else float("nan")} for k in b}


def format_dims(dims: dict[str, Dim]) -> str:
    return ", ".join(f"{k}={v}" for k, v in dims.items())
