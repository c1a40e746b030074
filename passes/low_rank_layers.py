"""Which layers ``low_rank`` can factorise, their names and structure roles, and the rewrite.

A layer is a projection that reads its constant weight directly (``graphopt.ir.projection``:
``linear(x, W, b)``, or a captured ``matmul(x, W)`` whose bias ``add`` stays as it is) or a 1x1
``conv2d`` without groups. Its name
is the module path the frontend recorded (``encoder.layer.0.attention.self.query``), or the path
in an ONNX value name (``/a/base/MatMul_output_0`` -> ``a.base``), else the weight's name.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import sympy
import torch

from graphopt.ir import Graph, Node, TensorType, Value
from graphopt.ir.cost import graph_cost
from graphopt.ir.projection import Projection, projection_at

ROLE_GROUPS = {
    "attention": {"q", "k", "v", "out"}, "qkv": {"q", "k", "v"}, "mlp": {"fc1", "fc2", "gate"},
    "q": {"q"}, "k": {"k"}, "v": {"v"}, "out": {"out"}, "fc1": {"fc1"}, "fc2": {"fc2"}, "gate": {"gate"},
    "other": {"other"},
}


@dataclass
class Layer:
    node: Node
    kind: str            # linear | matmul | conv1x1
    name: str
    weight: Value
    role: str = "other"
    projection: Projection | None = None  # None for a 1x1 conv2d

    @property
    def matrix(self) -> torch.Tensor:
        """W as [out, in]."""
        if self.projection is not None:
            return self.projection.matrix
        w = self.weight.const
        return w.reshape(w.shape[0], w.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        m, n = self.matrix.shape
        return int(m), int(n)

    @property
    def input(self) -> Value:
        return self.node.inputs[0]


def layer_name(node: Node, weight: Value) -> str:
    module = node.meta.get("module")
    if module:
        return str(module)
    out = node.outputs[0].name
    if out.startswith("/") and out.count("/") >= 2:
        return ".".join(p for p in out.strip("/").split("/")[:-1] if p)
    return weight.name


def find_layers(graph: Graph) -> list[Layer]:
    layers = []
    for node in graph.nodes:
        proj = projection_at(node, factored=False)
        if proj is not None and node.inputs[1] is proj.weight and (not proj.transposed or proj.input.type.rank >= 2):
            layers.append(Layer(node, "matmul" if proj.transposed else "linear", layer_name(node, proj.weight),
                                proj.weight, projection=proj))
        elif node.op == "conv2d" and node.inputs[1].is_constant and tuple(node.inputs[1].type.shape[2:]) == (1, 1) \
                and node.attrs["groups"] == 1:
            layers.append(Layer(node, "conv1x1", layer_name(node, node.inputs[1]), node.inputs[1]))
    _assign_roles(graph, layers)
    seen: dict[str, int] = {}
    for layer in layers:  # names must be unique to address layers by name
        if layer.name in seen:
            seen[layer.name] += 1
            layer.name = f"{layer.name}#{seen[layer.name]}"
        else:
            seen[layer.name] = 0
    return layers


def _assign_roles(graph: Graph, layers: list[Layer]) -> None:
    from graphopt.ir.structure import StructureError, analyze

    try:
        structure = analyze(graph)
    except StructureError:
        return
    roles: dict[int, str] = {}
    for block in structure.blocks:
        a, mlp = block.attention, block.mlp
        for role, proj in (("q", a.q), ("k", a.k), ("v", a.v), ("out", a.out), ("fc1", mlp.fc1), ("fc2", mlp.fc2),
                           ("gate", mlp.gate)):
            if proj is not None:
                roles.setdefault(id(proj.weight), role)
    for layer in layers:
        layer.role = roles.get(id(layer.weight), "other")


def layer_names(layers: list[Layer]) -> str:
    """The first dozen layer names, for an error that lists what exists."""
    return ", ".join(l.name for l in layers[:12]) + (" ..." if len(layers) > 12 else "")


def select_layers(layers: list[Layer], patterns: list[str], exclude: list[str], roles: list[str]) -> list[Layer]:
    """Glob patterns (``*`` ``?``; a pattern starting with ``re:`` is a regular expression) on the
    layer name or the weight's name; roles from ROLE_GROUPS. A pattern or role matching nothing is
    an error that lists what exists."""
    def hits(pattern: str, layer: Layer) -> bool:
        if pattern.startswith("re:"):
            rx = re.compile(pattern[3:])
            return bool(rx.search(layer.name) or rx.search(layer.weight.name))
        return fnmatch.fnmatchcase(layer.name, pattern) or fnmatch.fnmatchcase(layer.weight.name, pattern)

    if not layers:
        raise ValueError("the graph has no float linear or conv layer with a constant weight to rewrite (an "
                         "integer_only graph's int.linear are not: run this pass before integer_only)")
    names = layer_names(layers)
    chosen = list(layers)
    if patterns:
        for p in patterns:
            if not any(hits(p, l) for l in layers):
                raise ValueError(f"layer pattern {p!r} matches no layer; the layers are: {names}")
        chosen = [l for l in chosen if any(hits(p, l) for p in patterns)]
    if roles:
        wanted: set[str] = set()
        for r in roles:
            if r not in ROLE_GROUPS:
                raise ValueError(f"unknown role {r!r}; use one of {sorted(ROLE_GROUPS)}")
            wanted |= ROLE_GROUPS[r]
        present = {l.role for l in layers}
        if not wanted & present:
            raise ValueError(f"roles {roles} match no layer: the structure analysis found roles "
                             f"{sorted(present)} (no transformer blocks found means every layer is 'other')")
        chosen = [l for l in chosen if l.role in wanted]
    for p in exclude:
        if not any(hits(p, l) for l in layers):
            raise ValueError(f"exclude pattern {p!r} matches no layer; the layers are: {names}")
        chosen = [l for l in chosen if not hits(p, l)]
    if not chosen:
        raise ValueError("the layer selection (layers/roles/exclude) leaves no layer")
    return chosen


def reduces_cost(layer: Layer, rank: int) -> bool:
    """Whether the factorised pair costs fewer FLOPs than the dense layer, by the cost model."""
    m, n = layer.shape
    g = Graph("probe")
    x = g.add_input("x", TensorType(torch.float32, ("rows", n)))
    dense = g.op.linear(x, g.add_constant(_meta(m, n)))
    g.set_outputs([dense])
    f = Graph("probe")
    x = f.add_input("x", TensorType(torch.float32, ("rows", n)))
    mid = f.op.linear(x, f.add_constant(_meta(rank, n)))
    f.set_outputs([f.op.linear(mid, f.add_constant(_meta(m, rank)))])
    rows = sympy.Symbol("rows", integer=True, positive=True)
    diff = sympy.expand(graph_cost(g).total.flops - graph_cost(f).total.flops)
    return bool(diff.subs(rows, 1) > 0)


def _meta(*shape) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def rewrite(graph: Graph, layer: Layer, a: torch.Tensor, b: torch.Tensor) -> None:
    """Replace the layer by ``x -> A -> B`` (A [r, n], B [m, r]); the bias stays on B."""
    node, rank = layer.node, a.shape[0]
    base = layer.weight.name
    meta = {"low_rank": {"layer": layer.name, "rank": rank, "shape": layer.shape}}
    with graph.inserting_before(node):
        if layer.kind == "linear":
            va = graph.add_constant(a, f"{base}.lr_a")
            vb = graph.add_constant(b, f"{base}.lr_b")
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            first = graph.create_node("linear", [node.inputs[0], va], meta={**meta, "low_rank_part": "a"})
            second = graph.create_node("linear", [first.output, vb, bias], meta={**meta, "low_rank_part": "b"})
        elif layer.kind == "matmul":
            va = graph.add_constant(a.t().contiguous(), f"{base}.lr_a")
            vb = graph.add_constant(b.t().contiguous(), f"{base}.lr_b")
            first = graph.create_node("matmul", [node.inputs[0], va], meta={**meta, "low_rank_part": "a"})
            second = graph.create_node("matmul", [first.output, vb], meta={**meta, "low_rank_part": "b"})
        else:
            attrs = node.attrs
            va = graph.add_constant(a.reshape(rank, -1, 1, 1).contiguous(), f"{base}.lr_a")
            vb = graph.add_constant(b.reshape(b.shape[0], rank, 1, 1).contiguous(), f"{base}.lr_b")
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            first = graph.create_node("conv2d", [node.inputs[0], va],
                                      {"stride": attrs["stride"], "padding": attrs["padding"]},
                                      meta={**meta, "low_rank_part": "a"})
            second = graph.create_node("conv2d", [first.output, vb, bias], meta={**meta, "low_rank_part": "b"})
    graph.replace_all_uses_with(node.output, second.output)
    graph.erase_node(node)


def replace_weight(graph: Graph, layer: Layer, matrix: torch.Tensor) -> None:
    """Give the layer the weight ``matrix`` ([out, in]) as a new constant in the layer's own layout
    (the old one may be shared with other nodes)."""
    name = f"{layer.weight.name}.corrected"
    if layer.projection is not None:
        layer.projection.set_matrix(graph, matrix, name)
        return
    w = layer.weight.const
    graph.set_input(layer.node, 1, graph.add_constant(matrix.reshape(w.shape).to(w.dtype).contiguous(), name))


def rows_of(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """A layer input as [tokens, features] (channels last for convolutions)."""
    if kind == "conv1x1":
        return tensor.permute(0, 2, 3, 1).reshape(-1, tensor.shape[1])
    return tensor.reshape(-1, tensor.shape[-1])
