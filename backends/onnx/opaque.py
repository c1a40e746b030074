"""ONNX kernels of the ops the IR keeps opaque.

``onnx_opaque`` nodes (read from an ONNX file and not converted) are written back verbatim with
the opset imports they need (``com.microsoft`` and so on); captured outer values their subgraphs
read are renamed to what they are called now. ATen ``opaque`` nodes lower where a lowering for
their target is registered (``register_aten_lowering``; plugins through the ``graphopt.kernels``
entry-point group); otherwise the node is refused naming the target.
"""
from __future__ import annotations

import copy
from typing import Callable

import onnx
import torch
from onnx import helper

from graphopt.backends import LoweringError
from graphopt.backends.onnx.emitter import out_dtype, register_lowering
from graphopt.backends.onnx.nn import reduce_mean
from graphopt.backends.onnx.shape import bound
from graphopt.ir import Node
from graphopt.ir.onnx_common import INT64_MAX
from graphopt.ir.ops.onnx_opaque import OP as ONNX_OPAQUE
from graphopt.ir.ops.opaque import TensorArg
from graphopt.ir.registry import Registry


@register_lowering(ONNX_OPAQUE)
def _onnx_opaque(em, node):
    """The node as read, its attributes (subgraphs included) and functions copied verbatim."""
    a = node.attrs
    captures = tuple(a["captures"])
    n_own = len(node.inputs) - len(captures)
    inputs = [em.input(node, i) for i in range(n_own)]
    present = [em.out(node, i) for i in range(len(node.outputs))]
    total = len(node.outputs) + len(a["skip_outputs"])
    skip = set(a["skip_outputs"])
    outputs, it = [], iter(present)
    for i in range(total):
        outputs.append("" if i in skip else next(it))
    protos = a["attributes"].protos() if a["attributes"] is not None else []
    renames = {old: em.input(node, n_own + j) for j, old in enumerate(captures)}
    renames = {k: v for k, v in renames.items() if k != v}
    if renames:
        protos = [_rename_captures(p, renames) for p in protos]
    for blob in a["functions"]:
        f = onnx.FunctionProto.FromString(blob)
        em.functions.setdefault((f.domain, f.name, getattr(f, "overload", "")), f)
    n = onnx.NodeProto()
    n.op_type = a["op_type"]
    if a["domain"]:
        n.domain = a["domain"]
    n.input.extend(inputs)
    n.output.extend(outputs)
    n.attribute.extend(protos)
    n.name = em.fresh_node_name(node.meta.get("onnx_name") or f"{a['op_type']}_{em.counter + 1}")
    em.counter += 1
    em.nodes.append(n)
    return present


def _rename_captures(attr: onnx.AttributeProto, renames: dict[str, str]) -> onnx.AttributeProto:
    if attr.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return attr
    attr = copy.deepcopy(attr)
    graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
    for g in graphs:
        _rename_in_graph(g, renames)
    return attr


def _rename_in_graph(g: onnx.GraphProto, renames: dict[str, str]) -> None:
    local = {vi.name for vi in g.input} | {t.name for t in g.initializer}
    active = {k: v for k, v in renames.items() if k not in local}
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in active:
                n.input[i] = active[name]
        for attr in n.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_in_graph(attr.g, active)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _rename_in_graph(sub, active)
    for o in g.output:
        if o.name in active:
            # a subgraph output that is directly an outer value: route it through an Identity
            inner = f"{o.name}__outer"
            g.node.append(helper.make_node("Identity", [active[o.name]], [inner]))
            o.name = inner


# ---- ATen opaque nodes ---------------------------------------------------------------------
ATEN_LOWERINGS: Registry[Callable] = Registry(
    "ATen ONNX lowering", group="graphopt.kernels",
    hint="; register one with graphopt.backends.onnx.register_aten_lowering")


def register_aten_lowering(target: str, *, replace: bool = False):
    """Decorator: ``fn(em, node)`` writes ATen ``opaque`` nodes of this target
    (``aten::index.Tensor``) as standard ONNX ops; ``em`` as for ``register_lowering``."""
    return ATEN_LOWERINGS.decorator(target, replace=replace)


def _aten_target_lowered(node: Node) -> str | None:
    target = node.attrs["target"]
    if ATEN_LOWERINGS.find(target) is None:
        return f"no ONNX lowering for {target}; register one with graphopt.backends.onnx.register_aten_lowering"
    return None


@register_lowering("opaque", supports=_aten_target_lowered)
def aten_opaque(em, node):
    return ATEN_LOWERINGS.get(node.attrs["target"])(em, node)


@register_aten_lowering("aten::index.Tensor")
def _aten_index(em, node):
    args = node.attrs["args"]
    x = node.inputs[0]
    indices = list(args[1])
    tensor_positions = [(pos, item.index) for pos, item in enumerate(indices) if isinstance(item, TensorArg)]
    if any(item is not None and not isinstance(item, TensorArg) for item in indices):
        raise LoweringError(f"aten::index.Tensor with non-tensor indices (node {node.label()})")
    for _, idx in tensor_positions:
        if node.inputs[idx].type.dtype is torch.bool:
            raise LoweringError(f"no ONNX lowering for aten::index.Tensor with a boolean mask (node {node.label()})")
    out = node.outputs[0]
    if len(tensor_positions) == 1:
        pos, idx = tensor_positions[0]
        return em.one("Gather", [em.value(x), em.input(node, idx)], em.out(node), axis=pos)
    positions = [p for p, _ in tensor_positions]
    if positions != list(range(len(positions))):
        raise LoweringError(f"no ONNX lowering for aten::index.Tensor with non-leading tensor indices "
                            f"(node {node.label()})")
    k = len(positions)
    batch = list(out.type.shape[:out.type.rank - (x.type.rank - k)])
    target = em.dims(batch)
    stacked = []
    for _, idx in tensor_positions:
        expanded = em.one("Expand", [em.input(node, idx, torch.int64), target])
        stacked.append(em.one("Unsqueeze", [expanded, em.literal([-1])]))
    return em.one("GatherND", [em.value(x), em.one("Concat", stacked, axis=-1)], em.out(node))


def _aten_arg(node, index: int, name: str, default=None):
    args, kwargs = node.attrs["args"], node.attrs["kwargs"] or {}
    return args[index] if len(args) > index else kwargs.get(name, default)


@register_aten_lowering("aten::unbind.int")
def _aten_unbind(em, node):
    x = node.inputs[0]
    dim = _aten_arg(node, 1, "dim", 0) % x.type.rank
    n = len(node.outputs)
    parts = em.node("Split", [em.value(x), em.literal([1] * n)], [em.tmp(f"split{i}") for i in range(n)], axis=dim)
    axes = em.literal([dim])
    return [em.one("Squeeze", [part, axes], em.out(node, i)) for i, part in enumerate(parts)]



def _aten_tensor(em, node, index: int, name: str, dtype: torch.dtype | None = None) -> str:
    """The ONNX name of a tensor argument of an ATen node ("" when it is None)."""
    arg = _aten_arg(node, index, name)
    return em.input(node, arg.index, dtype) if isinstance(arg, TensorArg) else ""


def _aten_operand(em, node, index: int, name: str, dtype: torch.dtype) -> str:
    """A tensor or Python-scalar argument as an ONNX name of ``dtype``."""
    arg = _aten_arg(node, index, name)
    return em.input(node, arg.index, dtype) if isinstance(arg, TensorArg) else em.literal(arg, dtype)


def _axis(node, index: int, name: str, rank: int, default=0) -> int:
    return _aten_arg(node, index, name, default) % max(rank, 1)


def _aten_binary(op_type: str):
    """``op(self, other)`` with either side a tensor or a Python scalar."""
    def lower(em, node):
        dtype = out_dtype(node)
        return em.one(op_type, [_aten_operand(em, node, 0, "self", dtype), _aten_operand(em, node, 1, "other", dtype)],
                      em.out(node))
    return lower


for _target, _op_type in (("aten::min.other", "Min"), ("aten::max.other", "Max"), ("aten::minimum.default", "Min"),
                          ("aten::maximum.default", "Max")):
    register_aten_lowering(_target)(_aten_binary(_op_type))


@register_aten_lowering("aten::cumsum")
def _aten_cumsum(em, node):
    """Bool and int32 inputs sum in the output dtype (int64), as torch does."""
    x = node.inputs[0]
    return em.one("CumSum", [em.input(node, 0, out_dtype(node)), em.literal(_axis(node, 1, "dim", x.type.rank))],
                  em.out(node))


@register_aten_lowering("aten::diff")
def _aten_diff(em, node):
    """``x[1:] - x[:-1]`` along ``dim``, ``n`` times, after concatenating ``prepend`` and ``append``."""
    x = node.inputs[0]
    if x.type.dtype is torch.bool:
        raise LoweringError(f"no ONNX lowering for aten::diff of a boolean tensor (node {node.label()})")
    dim = _axis(node, 2, "dim", x.type.rank, -1)
    parts = [p for p in (_aten_tensor(em, node, 3, "prepend"), em.value(x), _aten_tensor(em, node, 4, "append")) if p]
    y = parts[0] if len(parts) == 1 else em.one("Concat", parts, axis=dim)
    axes, one = em.literal([dim]), em.literal([1])
    for _ in range(_aten_arg(node, 1, "n", 1)):
        later = em.one("Slice", [y, one, em.literal([INT64_MAX]), axes])
        earlier = em.one("Slice", [y, em.literal([0]), em.literal([-1]), axes])
        y = em.one("Sub", [later, earlier])
    return em.one("Identity", [y], em.out(node))


@register_aten_lowering("aten::argmax")
def _aten_argmax(em, node):
    x, dim = em.input(node, 0), _aten_arg(node, 1, "dim")
    keepdim = int(bool(_aten_arg(node, 2, "keepdim", False)))
    if dim is None:
        return em.one("ArgMax", [em.one("Reshape", [x, em.literal([-1])])], em.out(node), axis=0, keepdims=keepdim)
    return em.one("ArgMax", [x], em.out(node), axis=dim % node.inputs[0].type.rank, keepdims=keepdim)


@register_aten_lowering("aten::argsort")
@register_aten_lowering("aten::argsort.stable")
def _aten_argsort(em, node):
    """A full-length TopK, which puts equal values in index order (a stable sort, either direction)."""
    x = node.inputs[0]
    dim = _axis(node, 1, "dim", x.type.rank, -1)
    descending = bool(_aten_arg(node, 2, "descending", False))
    k = em.dim1(x.type.shape[dim])
    _, indices = em.node("TopK", [em.value(x), k], [em.tmp("values"), em.out(node)], axis=dim,
                         largest=int(descending), sorted=1)
    return indices


def _conv(em, node, spatial: int):
    """conv1d / conv2d, with list or string ('same' / 'valid') padding."""
    dtype = out_dtype(node)
    w = node.inputs[1]
    kernel = list(w.type.shape[2:])
    if not all(isinstance(k, int) for k in kernel):
        raise LoweringError(f"convolution with a symbolic kernel size (node {node.label()})")
    expand = lambda v, default: list(v) * spatial if len(v) == 1 else list(v)
    stride = expand(_aten_arg(node, 3, "stride", [1]), 1)
    padding = _aten_arg(node, 4, "padding", [0])
    dilation = expand(_aten_arg(node, 5, "dilation", [1]), 1)
    if isinstance(padding, str):
        if padding == "valid":
            begin = end = [0] * spatial
        else:  # 'same' (stride 1): torch puts the odd element of padding at the end
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            begin = [t // 2 for t in total]
            end = [t - b for t, b in zip(total, begin)]
    else:
        begin = end = expand(padding, 0)
    inputs = [em.input(node, 0, dtype), em.input(node, 1, dtype)]
    bias = _aten_tensor(em, node, 2, "bias", dtype)
    if bias:
        inputs.append(bias)
    return em.one("Conv", inputs, em.out(node), strides=stride, dilations=dilation, pads=begin + end,
                  group=_aten_arg(node, 6, "groups", 1), kernel_shape=kernel)


register_aten_lowering("aten::conv1d")(lambda em, node: _conv(em, node, 1))
register_aten_lowering("aten::conv1d.padding")(lambda em, node: _conv(em, node, 1))
register_aten_lowering("aten::conv2d.padding")(lambda em, node: _conv(em, node, 2))


def _batch_norm(em, node, eps: float) -> str:
    """Inference batch norm with the running statistics (absent weight / bias: 1 / 0)."""
    dtype = out_dtype(node)
    channels = node.inputs[0].type.shape[1]
    if not isinstance(channels, int):
        raise LoweringError(f"batch norm over a symbolic channel count (node {node.label()})")
    weight = _aten_tensor(em, node, 1, "weight", dtype) or em.literal([1.0] * channels, dtype)
    bias = _aten_tensor(em, node, 2, "bias", dtype) or em.literal([0.0] * channels, dtype)
    mean, var = _aten_tensor(em, node, 3, "running_mean", dtype), _aten_tensor(em, node, 4, "running_var", dtype)
    if not mean or not var:
        raise LoweringError(f"batch norm without running statistics (node {node.label()})")
    return em.one("BatchNormalization", [em.input(node, 0, dtype), weight, bias, mean, var], em.out(node, 0),
                  epsilon=float(eps))


@register_aten_lowering("aten::batch_norm")
def _aten_batch_norm(em, node):
    if _aten_arg(node, 5, "training", False):
        raise LoweringError(f"aten::batch_norm in training mode (node {node.label()})")
    return _batch_norm(em, node, _aten_arg(node, 7, "eps", 1e-5))


@register_aten_lowering("aten::_native_batch_norm_legit_no_training")
def _aten_native_batch_norm(em, node):
    """Outputs 1 and 2 (saved statistics) are empty at inference."""
    out = _batch_norm(em, node, _aten_arg(node, 6, "eps", 1e-5))
    empty = [em.one("Identity", [em.literal(torch.zeros(v.type.shape, dtype=v.type.dtype).tolist(), v.type.dtype,
                                            shape=v.type.shape)], em.out(node, i))
             for i, v in enumerate(node.outputs) if i > 0]
    return [out] + empty


@register_aten_lowering("aten::group_norm")
def _aten_group_norm(em, node):
    """Normalize each of ``num_groups`` channel groups over its channels and positions, then scale per channel."""
    dtype = out_dtype(node)
    x = node.inputs[0]
    groups, eps = _aten_arg(node, 1, "num_groups"), float(_aten_arg(node, 4, "eps", 1e-5))
    xv = em.input(node, 0, dtype)
    grouped = em.one("Reshape", [xv, em.literal([0, groups, -1])])
    centered = em.one("Sub", [grouped, reduce_mean(em, grouped, [2], 1)])
    var = reduce_mean(em, em.one("Mul", [centered, centered]), [2], 1)
    normed = em.one("Div", [centered, em.one("Sqrt", [em.one("Add", [var, em.literal(eps, dtype)])])])
    y = em.one("Reshape", [normed, em.one("Shape", [xv])])
    per_channel = em.literal([-1] + [1] * (x.type.rank - 2))
    for index, name, op_type in ((2, "weight", "Mul"), (3, "bias", "Add")):
        arg = _aten_tensor(em, node, index, name, dtype)
        if arg:
            y = em.one(op_type, [y, em.one("Reshape", [arg, per_channel])])
    return em.one("Identity", [y], em.out(node))


@register_aten_lowering("aten::_weight_norm")
def _aten_weight_norm(em, node):
    """``g * v / ||v||``, the norm over every axis but ``dim``."""
    v, g = node.inputs[0], em.input(node, 1)
    dim = _aten_arg(node, 2, "dim", 0)
    axes = [a for a in range(v.type.rank) if a != dim % v.type.rank]
    vv = em.value(v)
    norm = em.one("Sqrt", [em.one("ReduceSum", [em.one("Mul", [vv, vv]), em.literal(axes)], keepdims=1)])
    return em.one("Mul", [g, em.one("Div", [vv, norm])], em.out(node))


@register_aten_lowering("aten::pad")
@register_aten_lowering("aten::constant_pad_nd")
def _aten_pad(em, node):
    """torch lists (begin, end) pairs from the last axis backwards; ONNX all begins, then all ends."""
    x = node.inputs[0]
    pads = list(_aten_arg(node, 1, "pad"))
    is_pad = node.attrs["target"] == "aten::pad"
    mode = _aten_arg(node, 2, "mode", "constant") if is_pad else "constant"
    value = _aten_arg(node, 3 if is_pad else 2, "value", None) or 0
    modes = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
    if mode not in modes or not all(isinstance(p, int) for p in pads):
        raise LoweringError(f"aten::pad with mode {mode!r} or symbolic pads (node {node.label()})")
    rank = x.type.rank
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pads) // 2):
        begin[rank - 1 - i], end[rank - 1 - i] = pads[2 * i], pads[2 * i + 1]
    if not any(begin + end):
        return em.one("Identity", [em.value(x)], em.out(node))
    inputs = [em.value(x), em.literal(begin + end)]
    if mode == "constant":
        inputs.append(em.literal(value, x.type.dtype))
    return em.one("Pad", inputs, em.out(node), mode=modes[mode])


@register_aten_lowering("aten::max_pool2d")
def _aten_max_pool2d(em, node):
    pair = lambda v: list(v) * 2 if len(v) == 1 else list(v)
    kernel = pair(_aten_arg(node, 1, "kernel_size"))
    stride = pair(_aten_arg(node, 2, "stride", None) or kernel)
    padding = pair(_aten_arg(node, 3, "padding", [0]))
    dilation = pair(_aten_arg(node, 4, "dilation", [1]))
    return em.one("MaxPool", [em.input(node, 0)], em.out(node), kernel_shape=kernel, strides=stride,
                  pads=padding + padding, dilations=dilation, ceil_mode=int(bool(_aten_arg(node, 5, "ceil_mode", False))))


def _adaptive_avg_pool(em, node):
    """Output size 1 is a mean; an output size that divides the input is an AveragePool."""
    x = node.inputs[0]
    out = list(_aten_arg(node, 1, "output_size"))
    spatial = list(x.type.shape[-len(out):])
    if all(o == 1 for o in out):
        return reduce_mean(em, em.value(x), list(range(x.type.rank - len(out), x.type.rank)), 1, em.out(node))
    if not all(isinstance(s, int) and s % o == 0 for s, o in zip(spatial, out)):
        raise LoweringError(f"{node.attrs['target']} from {spatial} to {out}: only sizes that divide the input "
                            f"(node {node.label()})")
    kernel = [s // o for s, o in zip(spatial, out)]
    return em.one("AveragePool", [em.value(x)], em.out(node), kernel_shape=kernel, strides=kernel)


register_aten_lowering("aten::adaptive_avg_pool1d")(_adaptive_avg_pool)
register_aten_lowering("aten::adaptive_avg_pool2d")(_adaptive_avg_pool)
register_aten_lowering("aten::_adaptive_avg_pool2d")(_adaptive_avg_pool)


@register_aten_lowering("aten::upsample_bilinear2d.vec")
@register_aten_lowering("aten::upsample_nearest2d.vec")
@register_aten_lowering("aten::upsample_bicubic2d.vec")
def _aten_upsample(em, node):
    """Resize to the captured output size; torch's coordinate conventions map to ONNX's by name."""
    target = node.attrs["target"]
    x, out = node.inputs[0], node.outputs[0]
    if "nearest" in target:
        mode, attrs = "nearest", {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    else:
        align = bool(_aten_arg(node, 2, "align_corners", False))
        mode = "linear" if "bilinear" in target else "cubic"
        attrs = {"coordinate_transformation_mode": "align_corners" if align else "pytorch_half_pixel"}
        if mode == "cubic":
            attrs["cubic_coeff_a"] = -0.75
    scales = _aten_arg(node, 3 if "nearest" not in target else 2, "scale_factors")
    if scales is not None and _aten_arg(node, 1, "output_size") is None and not attrs.get(
            "coordinate_transformation_mode") == "align_corners":
        # torch maps coordinates with the given scale factor, not with output/input sizes
        factors = em.literal([1.0, 1.0] + [float(f) for f in scales], torch.float32)
        return em.one("Resize", [em.value(x), "", factors], em.out(node), mode=mode, **attrs)
    return em.one("Resize", [em.value(x), "", "", em.dims(list(out.type.shape))], em.out(node), mode=mode, **attrs)


@register_aten_lowering("aten::repeat")
def _aten_repeat(em, node):
    x = node.inputs[0]
    repeats = list(_aten_arg(node, 1, "repeats"))
    xv = em.value(x)
    if len(repeats) > x.type.rank:
        xv = em.one("Reshape", [xv, em.dims([1] * (len(repeats) - x.type.rank) + list(x.type.shape))])
    return em.one("Tile", [xv, em.dims(repeats)], em.out(node))


@register_aten_lowering("aten::stack")
def _aten_stack(em, node):
    dim = _aten_arg(node, 1, "dim", 0) % node.outputs[0].type.rank
    dtype = out_dtype(node)
    axes = em.literal([dim])
    parts = [em.one("Unsqueeze", [em.input(node, a.index, dtype), axes]) for a in _aten_arg(node, 0, "tensors")]
    return em.one("Concat", parts, em.out(node), axis=dim)


@register_aten_lowering("aten::meshgrid.indexing")
@register_aten_lowering("aten::meshgrid")
def _aten_meshgrid(em, node):
    tensors = _aten_arg(node, 0, "tensors")
    indexing = (node.attrs["kwargs"] or {}).get("indexing", _aten_arg(node, 1, "indexing", "ij"))
    n = len(tensors)
    full = em.dims(list(node.outputs[0].type.shape))
    order = list(range(n))
    if indexing == "xy" and n >= 2:
        order[0], order[1] = 1, 0
    results = []
    for i, arg in enumerate(tensors):
        shape = [1] * n
        shape[order[i]] = -1
        column = em.one("Reshape", [em.input(node, arg.index), em.literal(shape)])
        results.append(em.one("Expand", [column, full], em.out(node, i)))
    return results


@register_aten_lowering("aten::copy")
@register_aten_lowering("aten::fill.Tensor")
@register_aten_lowering("aten::fill.Scalar")
def _aten_fill(em, node):
    """``copy(self, src)`` / ``fill(self, value)``: the source broadcast to self's shape and dtype."""
    out = node.outputs[0]
    src = _aten_operand(em, node, 1, "src", out.type.dtype)
    return em.one("Expand", [src, em.one("Shape", [em.input(node, 0)])], em.out(node))


def _scatter_into(em, node, dim: int, start, stop, piece: str) -> str:
    """``self`` with positions [start, stop) along ``dim`` replaced by ``piece``."""
    x = node.inputs[0]
    axes = em.literal([dim])
    before = em.one("Slice", [em.value(x), em.literal([0]), bound(em, start), axes])
    after = em.one("Slice", [em.value(x), bound(em, stop), em.literal([INT64_MAX]), axes])
    return em.one("Concat", [before, piece, after], em.out(node), axis=dim)


@register_aten_lowering("aten::select_scatter")
def _aten_select_scatter(em, node):
    x = node.inputs[0]
    dim = _axis(node, 2, "dim", x.type.rank)
    index = _aten_arg(node, 3, "index")
    if not isinstance(index, int) or (index < 0 and not isinstance(x.type.shape[dim], int)):
        raise LoweringError(f"aten::select_scatter at a symbolic or negative index (node {node.label()})")
    index = index % x.type.shape[dim] if index < 0 else index
    piece = em.one("Unsqueeze", [em.input(node, 1, x.type.dtype), em.literal([dim])])
    return _scatter_into(em, node, dim, index, index + 1, piece)


@register_aten_lowering("aten::slice_scatter")
def _aten_slice_scatter(em, node):
    x = node.inputs[0]
    dim = _axis(node, 2, "dim", x.type.rank)
    start = _aten_arg(node, 3, "start", None) or 0
    end = _aten_arg(node, 4, "end", None)
    step = _aten_arg(node, 5, "step", 1)
    size = x.type.shape[dim]
    end = size if end is None or (isinstance(end, int) and isinstance(size, int) and end >= size) else end
    if step != 1 or any(isinstance(v, int) and v < 0 for v in (start, end)):
        raise LoweringError(f"aten::slice_scatter with a step or negative bounds (node {node.label()})")
    return _scatter_into(em, node, dim, start, end, em.input(node, 1, x.type.dtype))
