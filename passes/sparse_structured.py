"""Structured pruning for ``sparsify``: whole MLP neurons and whole attention heads, removed from the graph.

A **group** is the set of units one block can lose: the hidden neurons of an MLP (rows of fc1 / gate,
columns of fc2) or the heads of an attention (rows of q, k, v per head, columns of the output
projection). Removing units rebuilds the nodes between the sources (fc1, q/k/v) and the sink (fc2,
out) with smaller weights and head counts, so every backend runs smaller dense GEMMs.

**Reformation** refits the sink to the dense output on the calibration activations (least squares:
with h the sink's input and K the kept columns, [W' b'] minimises E‖W' h_K + b' - (W h + b)‖²,
i.e. [W' b'] = [W b] G[:, K+1] (G[K+1, K+1] + ridge)⁻¹ with G = E[[h;1][h;1]ᵀ]). The ADMM of
"Search for Efficient LLMs" solves the same problem with a mask on the kept weights; removing whole
columns leaves no mask, so the closed form is its fixed point.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.ir import Graph, Node, Value
from graphopt.ir.structure import Projection, StructureError, analyze
from graphopt.ir.traversal import ancestors


@dataclass
class Group:
    kind: str                    # "neurons" | "heads"
    name: str                    # blocks.<index>.<kind>, blocks in the structure analysis's order
    sources: list[Projection]    # output rows sliced per unit
    sink: Projection             # input columns sliced per unit
    units: int                   # neurons, or heads
    unit_width: int              # sink columns per unit (1, or the head size)

    @property
    def sink_input(self) -> Value:
        return self.sink.input


def matrix(p: Projection) -> torch.Tensor:
    """The projection's weight as [out, in]."""
    w = p.weight.const
    return w if p.nodes[0].op == "linear" else w.t()


def _plain(p: Projection) -> bool:
    return p.nodes[0].op == "linear" or (p.nodes[0].op == "matmul" and p.nodes[0].inputs[1] is p.weight)


def find_groups(graph: Graph, kinds: set[str]) -> tuple[list[Group], list[str]]:
    """The prunable groups of the graph, and why blocks were skipped."""
    try:
        structure = analyze(graph)
    except StructureError as e:
        raise ValueError(f"structured pruning needs transformer blocks: {e}") from None
    groups, skipped = [], []
    for block in structure.blocks:
        name = f"blocks.{block.index}"
        mlp, att = block.mlp, block.attention
        if "neurons" in kinds:
            sources = [mlp.fc1] + ([mlp.gate] if mlp.gate is not None else [])
            if mlp.convs:
                skipped.append(f"{name}.neurons: convolutions between fc1 and fc2 (Mix-FFN) are not pruned")
            elif not all(_plain(p) for p in sources + [mlp.fc2]):
                skipped.append(f"{name}.neurons: a projection reads a transposed weight")
            else:
                groups.append(Group("neurons", f"{name}.neurons", sources, mlp.fc2, mlp.fc1.out_features, 1))
        if "heads" in kinds:
            if att.fused_qkv or att.num_kv_heads != att.num_heads:
                skipped.append(f"{name}.heads: fused qkv or grouped kv heads are not pruned")
            elif not all(_plain(p) for p in (att.q, att.k, att.v, att.out)):
                skipped.append(f"{name}.heads: a projection reads a transposed weight")
            else:
                groups.append(Group("heads", f"{name}.heads", [att.q, att.k, att.v], att.out, att.num_heads,
                                    att.head_size))
    return groups, skipped


def unit_scores(group: Group, criterion: str, gram: torch.Tensor | None) -> torch.Tensor:
    """Importance per unit: magnitude ‖source rows‖·‖sink columns‖, else (calibration) the energy the
    unit sends through the sink, sqrt(Σ_j G_jj ‖W_sink[:, j]‖²) over its columns."""
    w = matrix(group.sink).double()
    col2 = (w ** 2).sum(0)
    u = group.unit_width
    if criterion == "magnitude" or gram is None:
        src = sum((matrix(p).double() ** 2).sum(1) for p in group.sources)
        return (src.reshape(group.units, u).sum(1) * col2.reshape(group.units, u).sum(1)).sqrt()
    g = gram.diagonal()[:-1] if gram.shape[0] == w.shape[1] + 1 else gram.diagonal()
    return (g.double() * col2).reshape(group.units, u).sum(1).clamp_min(0).sqrt()


def kept_units(scores: torch.Tensor, fraction_removed: float) -> list[int]:
    drop = min(round(fraction_removed * scores.numel()), scores.numel() - 1)
    keep = scores.topk(scores.numel() - drop).indices
    return sorted(int(i) for i in keep)


def columns(group: Group, keep: list[int]) -> torch.Tensor:
    u = group.unit_width
    return torch.tensor([k * u + t for k in keep for t in range(u)], dtype=torch.long)


def reformed_sink(group: Group, cols: torch.Tensor, gram_aug: torch.Tensor, ridge: float,
                  cross_aug: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares sink weight [out, kept] (and bias) reproducing the dense sink output on the
    calibration activations; ``gram_aug`` = E[[h;1][h;1]ᵀ] of the sink input. With ``cross_aug`` =
    E[[h_dense;1][h;1]ᵀ], h is what the sink receives in the already-pruned model and the target is
    the dense model's sink output."""
    w = matrix(group.sink).double()
    bias = group.sink.bias.const.double() if group.sink.bias is not None else None
    n = w.shape[1]
    full = torch.cat([w, bias[:, None]], 1) if bias is not None else w
    idx = torch.cat([cols, torch.tensor([n])]) if bias is not None else cols
    g = gram_aug.double() if bias is not None else gram_aug[:n, :n].double()
    sub = g[idx][:, idx]
    sub = sub + ridge * sub.diagonal().mean().clamp_min(1e-12) * torch.eye(len(idx), dtype=torch.float64)
    c = g if cross_aug is None else cross_aug.double()
    rhs = full @ c[:, idx] if bias is not None else full @ c[:n][:, idx]
    solved = torch.linalg.solve(sub, rhs.t()).t()
    if bias is not None:
        return solved[:, :-1], solved[:, -1]
    return solved, None


def remove_units(graph: Graph, group: Group, keep: list[int], sink_weight: torch.Tensor | None = None,
                 sink_bias: torch.Tensor | None = None) -> None:
    """Rebuild sources -> ... -> sink with only the ``keep`` units (sink weight [out, kept] and bias
    given when reformed, else sliced)."""
    cols = columns(group, keep)
    mapping: dict[int, Value] = {}
    for p in group.sources:
        w = p.weight.const
        mapping[id(p.weight)] = graph.add_constant((w[cols] if p.nodes[0].op == "linear" else w[:, cols]).contiguous(),
                                                   f"{p.weight.name}.pruned")
        if p.bias is not None:
            mapping[id(p.bias)] = graph.add_constant(p.bias.const[cols].contiguous(), f"{p.bias.name}.pruned")
    sink = group.sink
    new_w = sink_weight if sink_weight is not None else matrix(sink)[:, cols]
    new_w = new_w.to(sink.weight.const.dtype)
    mapping[id(sink.weight)] = graph.add_constant((new_w if sink.nodes[0].op == "linear" else new_w.t()).contiguous(),
                                                  f"{sink.weight.name}.pruned")
    if sink_bias is not None and sink.bias is not None:
        mapping[id(sink.bias)] = graph.add_constant(sink_bias.to(sink.bias.const.dtype), f"{sink.bias.name}.reformed")

    first = sink.nodes[0]
    upstream = {id(n) for n in ancestors(first.inputs[0])} | {id(first)}
    touched = {id(p.weight) for p in group.sources} | {id(p.bias) for p in group.sources if p.bias is not None}
    region: list[Node] = []
    for node in graph.nodes:
        if id(node) in upstream and any(id(v) in touched for v in node.inputs if v is not None):
            region.append(node)
            touched.add(id(node.output))
    region_ids = {id(n) for n in region}
    for node in region + [n for n in sink.nodes if id(n) not in region_ids]:
        inputs = [mapping.get(id(v), v) if v is not None else None for v in node.inputs]
        attrs = _resized(node, group, len(keep))
        with graph.inserting_before(node):
            try:
                new = graph.create_node(node.op, inputs, attrs, meta=dict(node.meta))
            except Exception as e:
                raise ValueError(f"{group.name}: cannot resize node {node.label()} after removing "
                                 f"{group.units - len(keep)} {group.kind}: {e}") from None
        for old, out in zip(node.outputs, new.outputs):
            mapping[id(old)] = out
    for node in [n for n in sink.nodes]:
        graph.replace_all_uses_with(node.output, mapping[id(node.output)])
    graph.remove_dead()
    graph.remove_unused_constants()


def _resized(node: Node, group: Group, kept: int) -> dict:
    """Attributes of a node between sources and sink with the unit count changed (reshape shapes)."""
    attrs = dict(node.attrs)
    if node.op != "reshape":
        return attrs
    shape = list(attrs["shape"])
    u, n = group.unit_width, group.units
    if group.kind == "heads":
        for i in range(len(shape) - 1):
            if shape[i] == n and shape[i + 1] == u:
                shape[i] = kept
                break
        else:
            if shape and shape[-1] == n * u:
                shape[-1] = kept * u
    else:
        shape = [kept if d == n else d for d in shape]
    attrs["shape"] = tuple(shape)
    return attrs
