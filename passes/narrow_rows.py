"""Compute only the rows (tokens) the outputs read.

A classifier reads one token of its last block, ``linear(select(layer_norm(h), dim=1, index=0))``;
a decoder that keeps the last position's logits reads ``slice(h, dim=1, start=-1)``. Every op of that
block after its keys and values computes each token from the same token of its inputs, so it can
run on the read token alone:

    %y = linear(%x, %w)              %s = slice(%x, dim=1, start=0, end=1)
    %z = gelu(%y)              ->    %y = linear(%s, %w)
    %o = select(%z, 1, 0)            %z = gelu(%y)
                                     %o = select(%z, dim=1, index=0)

A slice moves up through an op when the op computes each index of the sliced axis from the same
index of its inputs (NARROWS: elementwise ops, a GEMM's rows, norms and softmaxes over other axes,
attention's queries, reshapes and permutes that keep the axis), and when every reader of the op's
result takes that same slice. It stops at a value something reads whole, such as a block's input,
whose keys and values need every token. On DeiT-S this leaves the last block's K and V projections
whole and runs its Q projection, attention rows, output projection and MLP on the CLS token.

Integer ops compute each row exactly, so after ``integer_only`` the outputs are bit-identical; on
float graphs a GEMM over fewer rows may sum in another order (the 1e-4 tolerance). Run it after
``integer_only``: before, the last block would be calibrated on the read rows alone (other scales).
Readers of different rows share the span between them (DeiT's CLS and distillation tokens: rows 0..2).
"""
from __future__ import annotations

from collections import deque

from graphopt.ir import Graph
from graphopt.ir.ops.shape import BIG, slice_length
from graphopt.ir.types import dims_equal, normalize_axis
from graphopt.passes.registry import register_pass

ELEMENTWISE_INTEGER = {"int.requant", "int.add", "int.shiftgelu"}     # per element, scale tensors broadcast


def _aligned(node, axis: int, inputs=None) -> list[int | None] | None:
    """Each input's axis that lines up with the output's ``axis`` under broadcasting, None where the
    input broadcasts along it (size 1 or no such axis) or is not in ``inputs``; None for the whole when
    an input has another size there (its index i is not the output's index i)."""
    out = node.output.type
    found = []
    for i, v in enumerate(node.inputs):
        ax = axis - (out.rank - v.type.rank) if v is not None and (inputs is None or i in inputs) else -1
        if ax < 0 or dims_equal(v.type.shape[ax], 1):
            found.append(None)
        elif dims_equal(v.type.shape[ax], out.shape[axis]):
            found.append(ax)
        else:
            return None
    return found


def _same_attrs(axes):
    return None if axes is None else (axes, {})


def _elementwise(node, axis):
    return _same_attrs(_aligned(node, axis))


def _first_input(node, axis):
    """Ops computing from their first input only (the rest are tables or per-channel constants)."""
    return _same_attrs(_aligned(node, axis, inputs={0}))


def _over_last_axes(count):
    """Norms and softmaxes over the last ``count(node)`` axes: any axis before them."""
    def rule(node, axis):
        return None if axis >= node.output.type.rank - count(node) else _elementwise(node, axis)
    return rule


def _softmax(node, axis):
    return None if axis == normalize_axis(node.attrs["dim"], node.output.type.rank) else _elementwise(node, axis)


def _reduce(node, axis):
    x = node.inputs[0].type
    reduced = {normalize_axis(d, x.rank) for d in node.attrs["dims"]} if node.attrs["dims"] else set(range(x.rank))
    kept = [i for i in range(x.rank) if node.attrs["keepdim"] or i not in reduced]
    source = kept[axis]
    return (None if source in reduced else ([source], {}))


def _linear(node, axis):
    """A row of x @ W^T is that row of x."""
    return None if axis == node.output.type.rank - 1 else ([axis] + [None] * (len(node.inputs) - 1), {})


def _batch_axes(node, axis):
    """A batch axis of matrix products: each operand's own batch axis there, None where it broadcasts."""
    aligned = _aligned(node, axis)
    return None if aligned is None else ([ax if ax is not None and ax < v.type.rank - 2 else None
                                          for ax, v in zip(aligned, node.inputs)], {})


def _matmul(node, axis):
    """Rows of a @ b are rows of a; batch axes slice both operands where they do not broadcast."""
    out, a, b = node.output.type, node.inputs[0].type, node.inputs[1].type
    if axis == out.rank - 1 or a.rank < 2 or b.rank < 2:
        return None
    return ([a.rank - 2, None], {}) if axis == out.rank - 2 else _batch_axes(node, axis)


def _sdpa(node, axis):
    """Attention rows are query rows: q, and the mask where it has one row per query. A causal mask is
    aligned to the first query, so a later query alone would see too few keys."""
    out = node.output.type
    if node.attrs["is_causal"] or axis == out.rank - 1:
        return None
    q, k, v, mask = (list(node.inputs) + [None])[:4]
    if axis == out.rank - 2:
        axes = [q.type.rank - 2, None, None]
        if mask is not None:
            ax = mask.type.rank - 2
            axes.append(ax if ax >= 0 and dims_equal(mask.type.shape[ax], out.shape[axis]) else None)
        return axes, {}
    return _batch_axes(node, axis)


def _other_axis_slice(node, axis):
    """A slice (or concatenation) along another axis keeps this one as it is (RoPE's rotate_half)."""
    return None if axis == normalize_axis(node.attrs["dim"], node.output.type.rank) else \
        ([axis] * len(node.inputs), {})


def _select(node, axis):
    """The output's axes are the input's without the selected one."""
    dim = normalize_axis(node.attrs["dim"], node.inputs[0].type.rank)
    return [axis if axis < dim else axis + 1], {}


def _permute(node, axis):
    return [normalize_axis(node.attrs["dims"][axis], node.output.type.rank)], {}


def _reshape(node, axis, length):
    """A reshape that keeps every axis up to ``axis`` as it is (it splits or merges later axes only)."""
    x, out = node.inputs[0].type, node.output.type
    if axis >= x.rank or any(not dims_equal(x.shape[i], out.shape[i]) for i in range(axis + 1)):
        return None
    return [axis], {"shape": [length if i == axis else d for i, d in enumerate(out.shape)]}


NARROWS = {
    **{op: _elementwise for op in ELEMENTWISE_INTEGER},     # and every op tagged "elementwise" (narrowing())
    "int.lookup": _first_input,
    "layer_norm": _over_last_axes(lambda n: len(n.attrs["normalized_shape"])),
    "int.layernorm": _over_last_axes(lambda n: 1), "int.shiftmax": _over_last_axes(lambda n: 1),
    "softmax": _softmax, "mean": _reduce, "sum": _reduce, "amax": _reduce,
    "linear": _linear, "int.linear": _linear, "matmul": _matmul, "int.matmul": _matmul, "sdpa": _sdpa,
    "permute": _permute, "slice": _other_axis_slice, "cat": _other_axis_slice, "select": _select,
}


def narrowing(node, axis: int, length):
    """(axis to slice for each input or None, attributes to change) for computing only a slice of
    ``node``'s output along ``axis``, or None when the op mixes that axis."""
    if node.op == "reshape":
        return _reshape(node, axis, length)
    rule = NARROWS.get(node.op)
    if rule is None and "elementwise" in node.schema.tags:
        rule = _elementwise
    return rule(node, axis) if rule is not None else None


def _window(node):
    """(axis, start, end, step) a slice node keeps, normalised for comparing slices."""
    rank = node.inputs[0].type.rank
    return normalize_axis(node.attrs["dim"], rank), node.attrs["start"], node.attrs["end"], node.attrs["step"]


def _select_as_slice(graph: Graph, node) -> None:
    """select(x, d, i) -> select(slice(x, d, i, i + 1), d, 0) when x's producer can narrow; the slice can then move."""
    x = node.inputs[0]
    axis = normalize_axis(node.attrs["dim"], x.type.rank)
    if x.producer is None or x.type.shape[axis] == 1 or narrowing(x.producer, axis, 1) is None:
        return
    index = node.attrs["index"]
    end = BIG if index == -1 else index + 1
    with graph.inserting_before(node):
        one = graph.op.slice(x, dim=axis, start=index, end=end)
        picked = graph.op.select(one, dim=axis, index=0)
    graph.replace_all_uses_with(node.output, picked)
    graph.erase_node(node)


def _span(window, size: int) -> tuple[int, int]:
    """[start, end) of a step-1 window on an axis of static ``size``."""
    _, start, end, _ = window
    start = min(max(start + size if start < 0 else start, 0), size)
    end = size if end >= BIG else min(max(end + size if end < 0 else end, 0), size)
    return start, end


def _common_window(readers, size):
    """The window every reader's slice lies in: theirs when they are all one slice, else the span from the
    first start to the last end of step-1 slices on one axis of static size (DeiT's CLS and distillation
    tokens: 0..2); None when there is none."""
    windows = {_window(r) for r in readers}
    if len(windows) == 1:
        return windows.pop()
    if len({w[0] for w in windows}) != 1 or not isinstance(size, int) or \
            any(w[3] != 1 or not isinstance(w[1], int) or not isinstance(w[2], int) for w in windows):
        return None
    spans = [_span(w, size) for w in windows]
    return next(iter(windows))[0], min(s for s, _ in spans), max(e for _, e in spans), 1


def _sliced(graph: Graph, v, axis, start, end, step):
    """v[start:end:step] along axis: a new constant for a constant (its lowering may need one), else a slice."""
    if v.is_constant:
        index = (slice(None),) * axis + (slice(start, end, step),)
        return graph.add_constant(v.const[index].clone())
    return graph.op.slice(v, dim=axis, start=start, end=end, step=step)


def _move_up(graph: Graph, node) -> list | None:
    """Compute the slices that read ``node``'s input (all of them) by narrowing the value's producer to the
    window they share; the new slices of the producer's inputs, or None when it cannot move."""
    x = node.inputs[0]
    producer = x.producer
    if producer is None or len(producer.outputs) != 1 or any(o is x for o in graph.outputs):
        return None
    readers = x.users
    if any(r.op != "slice" for r in readers):
        return None
    window = _common_window(readers, x.type.shape[_window(node)[0]])
    if window is None:
        return None
    axis, start, end, step = window
    size = x.type.shape[axis]
    length = slice_length(size, start, end, step)
    if dims_equal(length, size):
        return None
    found = narrowing(producer, axis, length)
    if found is None:
        return None
    axes, attrs = found
    inputs, new_slices = [], []
    with graph.inserting_before(producer):
        for v, ax in zip(producer.inputs, axes):
            inputs.append(v if ax is None else _sliced(graph, v, ax, start, end, step))
            if inputs[-1] is not v and inputs[-1].producer is not None:
                new_slices.append(inputs[-1].producer)
        narrowed = graph.call(producer.op, *inputs, **{**producer.attrs, **attrs})
    narrowed.producer.meta.update(producer.meta)
    for reader in readers:
        part = narrowed
        if _window(reader) != window:            # its own part of the common window
            lo, hi = _span(_window(reader), size)
            with graph.inserting_before(reader):
                part = graph.op.slice(narrowed, dim=axis, start=lo - start, end=hi - start)
        graph.replace_all_uses_with(reader.output, part)
        graph.erase_node(reader)
    graph.erase_node(producer)
    return new_slices


def _moved_slices(graph: Graph) -> int:
    """Move every slice as far up as it goes; the number of ops narrowed."""
    work = deque(n for n in graph.nodes if n.op == "slice")
    moved = 0
    while work:
        node = work.popleft()
        if node.graph is not graph:          # erased: merged into a slice that moved
            continue
        new = _move_up(graph, node)
        if new is None:
            continue
        moved += 1
        for s in new:                        # its siblings on the same value may all be slices now
            work.extend(u for u in s.inputs[0].users if u.op == "slice")
    return moved


def _narrowed(graph: Graph) -> int:
    """Narrow ``graph`` in place; the number of ops narrowed."""
    graph.remove_dead()                      # a select nothing reads would keep its value whole
    for node in [n for n in graph.nodes if n.op == "select"]:
        _select_as_slice(graph, node)
    moved = _moved_slices(graph)
    for node in [n for n in graph.nodes if n.op == "select"]:
        _fold_unmoved(graph, node)
    graph.remove_dead()
    return moved


def _applies(graph: Graph) -> str | None:
    """None when narrowing a copy of the graph narrows some op, else the reason."""
    if _narrowed(graph.clone()):
        return None
    return ("no op can run on fewer rows: no select or slice reads part of an axis whose producer computes each "
            "index from the same index of its inputs while nothing else reads the producer's result whole "
            "(a classifier's select(h, 1, 0) after its last block is one that can)")


@register_pass("narrow_rows", tolerance=1e-4, requires=_applies)
def narrow_rows(graph: Graph, ctx) -> None:
    """Run the ops after a select or slice of tokens on the selected tokens only (a classifier's last
    block on its CLS token). Exact on integer graphs."""
    ctx.count("ops_narrowed", _narrowed(graph))


def _fold_unmoved(graph: Graph, node) -> None:
    """select(slice(x, d, i, i + 1), d, 0) -> select(x, d, i): a slice from _select_as_slice that did not move."""
    s = node.inputs[0].producer
    if s is None or s.op != "slice" or node.attrs["index"] != 0 or len(s.output.uses) != 1:
        return
    axis, start, end, step = _window(s)
    if normalize_axis(node.attrs["dim"], node.inputs[0].type.rank) != axis or step != 1 or \
            not (end == start + 1 or (start == -1 and end == BIG)):
        return
    with graph.inserting_before(node):
        direct = graph.op.select(s.inputs[0], dim=axis, index=start)
    graph.replace_all_uses_with(node.output, direct)
    graph.erase_node(node)
    graph.erase_node(s)
