"""Projections: the learned linear maps passes look for (structure analysis, ``lora_merge``,
``fuse_low_rank``, ``low_rank``), recognised in one place.

    linear(x, W, b)                    W [out, in], a 2-D constant
    matmul(x, W) (+ add(·, b))         W [in, out] (``transposed``): a captured ``x @ W``, GPT-2's Conv1D
    matmul(x, permute(W)) (+ add)      W [out, in] behind a transpose (``x @ W.T``)
    linear(linear(x, V), U, b)         a factorised projection (what ``low_rank`` writes; also in the
                                       matmul forms): a bias-free V [r, in] whose output only U reads,
                                       with r below both outer widths

ONNX files reach the IR with ``MatMul(x, Wᵀ) + Add`` already read as ``linear`` (the frontend does
that at import), so the matmul forms come from torch captures.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.ir.graph import Graph, Node, Value


@dataclass
class Projection:
    """``output = input @ Mᵀ (+ bias)`` with M the [out, in] matrix of the constant ``weight``."""
    nodes: list[Node]          # in data-flow order (a weight transpose first, a bias add last)
    input: Value
    output: Value
    weight: Value              # the stored constant; of a factorised projection, the outer factor U
    bias: Value | None
    in_features: int
    out_features: int
    transposed: bool = False   # weight stored [in, out] (matmul(x, W)) rather than [out, in]
    factors: tuple[Projection, Projection] | None = None  # (inner V, outer U) of a factorised projection

    @property
    def name(self) -> str:
        return self.weight.name

    @property
    def reader(self) -> Node:
        """The linear / matmul node that reads the input (of a factorised projection: the inner one)."""
        return self.factors[0].reader if self.factors else next(n for n in self.nodes if n.op in ("linear", "matmul"))

    @property
    def matrix(self) -> torch.Tensor:
        """M as [out, in] (of a factorised projection: U V)."""
        if self.factors:
            inner, outer = self.factors
            return outer.matrix @ inner.matrix
        w = self.weight.const
        return w.t() if self.transposed else w

    def set_matrix(self, graph: Graph, matrix: torch.Tensor, name: str) -> None:
        """Read the [out, in] ``matrix`` instead of the weight: a new constant ``name`` in the weight's
        own layout and dtype (the old one may be shared with other nodes, so it is never changed)."""
        if self.factors:
            raise ValueError(f"projection {self.name} is factorised: it has no single weight to replace")
        w = self.weight.const
        stored = (matrix.t() if self.transposed else matrix).to(w.dtype).contiguous()
        reader = self.nodes[0]  # the linear / matmul, or the transpose in front of it
        graph.set_input(reader, 0 if reader.op == "permute" else 1, graph.add_constant(stored, name))


def projection_at(node: Node | None, factored: bool = True) -> Projection | None:
    """The projection ``node`` belongs to when it is a projection's linear / matmul: with
    ``factored``, a factor of a factorised projection gives the whole pair; else None."""
    single = _single(node)
    if single is None or not factored:
        return single
    inner = _single(single.input.producer)
    if inner is not None and _pairs(inner, single):
        return _pair(inner, single)
    user = single.output.sole_user
    outer = _single(user) if single.bias is None else None
    if outer is not None and outer.input is single.output and _pairs(single, outer):
        return _pair(single, outer)
    return single


def projection_producing(value: Value, factored: bool = True) -> Projection | None:
    """The projection whose output is ``value`` (its linear / matmul, or the bias add after it)."""
    node = value.producer
    if node is None:
        return None
    candidates = [node] + ([v.producer for v in node.inputs if v is not None] if node.op == "add" else [])
    for candidate in candidates:
        proj = projection_at(candidate, factored)
        if proj is not None and proj.output is value:
            return proj
    return None


def _single(node: Node | None) -> Projection | None:
    if node is None or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if node.op == "linear" and _matrix(w):
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return Projection([node], x, node.output, w, bias, int(w.type.shape[1]), int(w.type.shape[0]))
    if node.op != "matmul" or x.is_constant:
        return None
    nodes, transposed = [node], True
    if not w.is_constant and w.producer is not None and w.producer.op == "permute" \
            and tuple(w.producer.attrs["dims"]) == (1, 0):
        nodes.insert(0, w.producer)
        w, transposed = w.producer.inputs[0], False
    if not _matrix(w):
        return None
    in_f, out_f = node.inputs[1].type.shape
    out, bias = node.output, None
    add = out.sole_user
    if add is not None and add.op == "add":
        other = [v for v in add.inputs if v is not out]
        if len(other) == 1 and other[0].is_constant and other[0].type.rank == 1:
            nodes.append(add)
            out, bias = add.output, other[0]
    return Projection(nodes, x, out, w, bias, int(in_f), int(out_f), transposed)


def _matrix(w: Value) -> bool:
    return w.is_constant and w.type.rank == 2


def _pairs(inner: Projection, outer: Projection) -> bool:
    """``outer(inner(x))`` is one factorised map: no bias between, nothing else reads the middle,
    and the middle is narrower than both ends (else it is two layers, not a factorisation)."""
    r = inner.out_features
    return inner.bias is None and inner.output.sole_user is outer.reader and outer.input is inner.output \
        and r < inner.in_features and r < outer.out_features


def _pair(inner: Projection, outer: Projection) -> Projection:
    return Projection(inner.nodes + outer.nodes, inner.input, outer.output, outer.weight, outer.bias,
                      inner.in_features, outer.out_features, outer.transposed, (inner, outer))
