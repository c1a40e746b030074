"""Rows of padding nobody reads: the cpu_integer kernels that may compute only a padded batch's real tokens.

After ``zero_padded_positions`` an output is ``where(keep [B, T, 1..], x, 0)`` with ``keep = ne(mask, 0)`` of a
graph input. Walking the kernel graph backwards from x, a value needs only its real-token rows when every use
of it needs only those:

- row-wise kernels (GEMM, LayerNorm, requant, add, dequantize) need the same rows of their row operands;
- layout ops move the batch and token axes (permute), keep them (a slice of another axis), or merge and split
  them with other axes (a reshape: [B, H, T, D] -> [B H, T, D], as the exact ONNX exporter writes attention);
- attention needs its query rows of Q, and of K and V only the keys its Shiftmax mask keeps (V only when the
  probabilities' zero point is 0, so that a masked key adds exactly 0 to a row).

Such kernels get a ``live`` input and write the rows they skip as 0; no real row ever reads them. That each
Shiftmax mask keeps exactly the real keys is a property of the inputs, so ``cpu.live_rows`` checks it on every
call, and where it fails every row is live (nothing skipped). Everything else keeps every row.
"""
from __future__ import annotations

import torch

from graphopt.ir import Graph, Node, Value
from graphopt.ir.opdef import OpError, register_op
from graphopt.ir.types import dims_equal

# (batch axis, its group, token axis, its group) of a value whose real-token rows suffice: along an axis of
# group g (B g or T g long: the batch merged with the g heads after it, as in [B H, T, D]), index i is batch
# or token i // g
Axes = tuple[int, int, int, int]

# kernel -> its operands read row for row like its output
ROW_OPERANDS = {"cpu.int_gemm": ("x", "res"), "cpu.int_layernorm": ("x",), "cpu.int_requant": ("x",),
                "cpu.int_add": ("a", "b"), "cpu.int_dequantize": ("x",)}
SKIPPING = {"cpu.int_gemm", "cpu.int_bmm", "cpu.int_layernorm", "cpu.int_requant", "cpu.int_add"}


def _live_rows_type(keep, *masks):
    if keep.dtype != torch.bool or keep.rank != 2:
        raise OpError(f"cpu.live_rows: expects a bool [batch, tokens] keep, got {keep}")
    return keep.with_dtype(torch.uint8)


@register_op("cpu.live_rows", inputs=["keep", "*masks"], infer=_live_rows_type, tags=["integer"])
def live_rows(keep, *masks):
    """keep as u8 when every Shiftmax mask [.., T, T] keeps exactly the real keys (keep[b, s]) in every real
    query row; else all ones: the row analysis relied on it, so nothing may be skipped."""
    b, t = keep.shape
    exact = torch.ones((), dtype=torch.bool)        # a tensor, not a Python branch: a replayed forward follows it
    for mask in masks:
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        if m.shape[-2:] != (t, t) or m.shape[0] not in (1, b):
            return torch.ones(b, t, dtype=torch.uint8)
        exact = exact & ((m == keep[:, None, None, :]) | ~keep[:, None, :, None]).all()
    return torch.where(exact, keep, True).to(torch.uint8)


def _input(node: Node, name: str) -> tuple[int, Value | None]:
    i = node.schema.inputs.index(name if name in node.schema.inputs else name + "?")
    return i, node.inputs[i] if i < len(node.inputs) else None


def _padding_outputs(graph: Graph) -> list[tuple[Node, Value]]:
    """(where, keep) for each output where(reshape(ne(mask, 0)), x, 0) of a [batch, tokens] graph input mask."""
    found = []
    for out in graph.outputs:
        node = out.producer
        if node is None or node.op != "where" or not node.inputs[2].is_constant or bool(node.inputs[2].const.any()):
            continue
        cond, x = node.inputs[0], node.inputs[1]
        ne = cond.producer.inputs[0].producer if cond.producer is not None and cond.producer.op == "reshape" else cond.producer
        if ne is None or ne.op != "ne" or not ne.inputs[1].is_constant or bool(ne.inputs[1].const.any()):
            continue
        mask = ne.inputs[0]
        if mask.producer is None and mask.type.rank == 2 and x.type.rank >= 2 and all(
                dims_equal(a, b) for a, b in zip(x.type.shape[:2], mask.type.shape)):
            found.append((node, ne.output))
    return found


def _operand_axes(node: Node, axes: Axes, masks: list[Value]) -> dict[int, Axes]:
    """The rows of node's inputs that node's output rows `axes` need (input index -> axes); inputs not listed
    are needed whole. Attention's masks are collected in `masks` for the check at run time."""
    ba, gb, ta, gt = axes
    out = node.outputs[0].type
    if node.op in ROW_OPERANDS:
        if max(ba, ta) >= out.rank - 1:
            return {}
        need = {}
        for name in ROW_OPERANDS[node.op]:
            i, v = _input(node, name)
            if v is not None and v.type.rank == out.rank and all(dims_equal(a, b) for a, b in
                                                                  zip(v.type.shape[:-1], out.shape[:-1])):
                need[i] = axes
        return need
    if node.op == "cpu.int_bmm":
        perm = node.attrs["out_perm"]            # output axis a is the result's axis perm[a]
        return _bmm_axes(node, (perm[ba], gb, perm[ta], gt) if perm else axes, masks)
    if node.op == "reshape":
        moved = _reshaped(axes, tuple(node.inputs[0].type.shape), tuple(out.shape))
        return {} if moved is None else {0: moved}
    if node.op == "permute":
        dims = node.attrs["dims"]
        return {0: (dims[ba] % out.rank, gb, dims[ta] % out.rank, gt)}
    if node.op == "slice":
        return {} if node.attrs["dim"] % out.rank in (ba, ta) else {0: axes}
    return {}


def _reshaped(axes: Axes, src: tuple, out: tuple) -> Axes | None:
    """The axes of a reshape's input holding the batch and token blocks of its output's `axes`, or None. With
    the same leading dims they stay; otherwise (static shapes) each block, B (or T) units of stride x group
    elements in the row-major order both shapes share, must be one input axis of stride s and B (or T) x
    group' elements, s x group' = unit."""
    ba, gb, ta, gt = axes
    keep = max(ba, ta) + 1
    if len(src) >= keep and all(dims_equal(a, b) for a, b in zip(src[:keep], out[:keep])):
        return axes
    if not all(isinstance(d, int) for d in (*src, *out)):
        return None
    strides_out, strides_src = _strides(out), _strides(src)
    moved = []
    for axis, group in ((ba, gb), (ta, gt)):
        unit, period = strides_out[axis] * group, strides_out[axis] * out[axis]
        hit = [a for a in range(len(src)) if unit % strides_src[a] == 0 and strides_src[a] * src[a] == period]
        if not hit:
            return None
        moved += [hit[0], unit // strides_src[hit[0]]]
    return tuple(moved)


def _strides(shape: tuple) -> list[int]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return strides[::-1]


def _bmm_axes(node: Node, axes: Axes, masks: list[Value]) -> dict[int, Axes]:
    """Q's rows for the output's rows; K's (Shiftmax with a key mask) or V's (probabilities with zero point 0
    from such a Shiftmax) real keys only."""
    ba, gb, ta, gt = axes
    rank = node.outputs[0].type.rank
    if ta != rank - 2 or gt != 1 or ba >= rank - 2:
        return {}
    need = {0: axes}
    _, pow2 = _input(node, "pow2")
    _, mask = _input(node, "mask")
    _, sizes = _input(node, "sizes")
    if pow2 is not None and mask is not None and sizes is None:         # scores + Shiftmax: b is K^T [.., D, S]
        need[1] = (ba, gb, rank - 1, 1)
        masks.append(mask)
    probs = node.inputs[0].producer
    if pow2 is None and node.attrs["a_zp"] == 0 and probs is not None and probs.op == "cpu.int_bmm" \
            and _input(probs, "mask")[1] is not None and _input(probs, "sizes")[1] is None \
            and _input(probs, "pow2")[1] is not None:                   # probabilities x V: b is V [.., S, D]
        need[1] = (ba, gb, rank - 2, 1)
        masks.append(_input(probs, "mask")[1])
    return need


def _demanded_rows(graph: Graph, wheres: set, masks: list[Value]) -> dict[Node, Axes]:
    """The nodes whose output is needed only at its real-token rows, with that output's axes. Reverse order:
    every use of a value has said what it needs before its producer is reached."""
    outputs = {id(v) for v in graph.outputs}
    need: dict[int, list] = {}
    found = {}
    for node in reversed(list(graph.nodes)):
        operand = {}
        if id(node) in wheres:
            operand = {1: (0, 1, 1, 1)}
        elif len(node.outputs) == 1:
            v = node.outputs[0]
            asked = need.get(id(v), []) + ([None] if id(v) in outputs else [])
            if asked and all(a is not None and a == asked[0] for a in asked):
                found[node] = asked[0]
                operand = _operand_axes(node, asked[0], masks)
        for i, x in enumerate(node.inputs):
            if x is not None:
                need.setdefault(id(x), []).append(operand.get(i))
    return found


def _live_for(graph: Graph, live: Value, rows: tuple, axes: Axes, batch, tokens) -> Value:
    """live [B, T] laid out as a kernel's rows (its output's shape less the last axis) with these axes: each
    grouped axis split as [B, g], live broadcast over everything else."""
    ba, gb, ta, gt = axes
    split, ones = [], []
    for i, d in enumerate(rows):
        parts = [(batch, gb)] if i == ba else [(tokens, gt)] if i == ta else [(d, 1)]
        for n, g in parts:
            split += [n] + ([g] if g != 1 else [])
            ones += [n] + ([1] if g != 1 else [])
        if i not in (ba, ta):
            ones[-1] = 1
    if ba > ta:
        live = graph.op.permute(live, dims=(1, 0))
    spread = graph.op.expand(graph.op.reshape(live, shape=tuple(ones)), shape=tuple(split))
    return spread if len(split) == len(rows) else graph.op.reshape(spread, shape=rows)


def mark_live_rows(graph: Graph) -> int:
    """Give the kernels of `graph` that only real-token rows feed a ``live`` input (in place); returns how many."""
    padding = _padding_outputs(graph)
    if not padding or len({id(keep) for _, keep in padding}) != 1:
        return 0
    graph.remove_dead()          # a value only dead code reads (a fusion's leftover layout op) needs no row
    keep = padding[0][1]
    masks: list[Value] = []
    rows = _demanded_rows(graph, {id(where) for where, _ in padding}, masks)
    kernels = [(n, a) for n, a in rows.items() if n.op in SKIPPING]
    batch, tokens = keep.type.shape
    if not kernels or not all(2 <= m.type.rank <= 4 and all(dims_equal(d, tokens) for d in m.type.shape[-2:])
                              and (m.type.rank < 4 or dims_equal(m.type.shape[0], 1)
                                   or dims_equal(m.type.shape[0], batch)) for m in masks):
        return 0
    first = next(n for n in graph.nodes if any(n is k for k, _ in kernels))
    shaped: dict[tuple, Value] = {}
    with graph.inserting_before(first):
        live = graph.create_node("cpu.live_rows", [keep, *{id(m): m for m in masks}.values()]).output
        for node, axes in kernels:
            rows_shape = tuple(node.outputs[0].type.shape[:-1])
            key = (tuple(str(d) for d in rows_shape), axes)
            if key not in shaped:      # the kernel's own rows shape, so the ONNX custom ops read it contiguous
                shaped[key] = _live_for(graph, live, rows_shape, axes, batch, tokens)
    for node, axes in kernels:
        index, _ = _input(node, "live")
        inputs = list(node.inputs) + [None] * (index + 1 - len(node.inputs))
        inputs[index] = shaped[(tuple(str(d) for d in node.outputs[0].type.shape[:-1]), axes)]
        with graph.inserting_before(node):
            new = graph.create_node(node.op, inputs, dict(node.attrs), meta=dict(node.meta))
        graph.replace_all_uses_with(node.outputs[0], new.outputs[0])
        graph.erase_node(node)
    graph.topological_sort()     # the masks checked by cpu.live_rows may be computed after the first kernel
    return len(kernels)
