"""ONNX -> IR handlers for network layers: convolution, normalization, softmax, pooling, reductions."""
from __future__ import annotations

from graphopt.frontends import Unsupported
from graphopt.frontends.onnx.handlers import attributes, handles
from graphopt.ir.types import dims_equal, normalize_axis


@handles("Conv")
def _conv(cv, node, ins):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    if x.type.rank != 4 or w.type.rank != 4:
        raise Unsupported("only 2-D convolutions map to conv2d")
    a = attributes(node)
    pad_mode = a.get("auto_pad", "NOTSET")
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if pad_mode == "VALID":
        pads = [0, 0, 0, 0]
    elif pad_mode != "NOTSET":
        raise Unsupported(f"auto_pad={pad_mode}")
    if pads[0] != pads[2] or pads[1] != pads[3]:
        raise Unsupported("asymmetric padding")
    kernel = a.get("kernel_shape")
    if kernel is not None and list(kernel) != list(w.type.shape[2:]):
        raise Unsupported("kernel_shape differs from the weight")
    return cv.op.conv2d(x, w, b, stride=tuple(a.get("strides", [1, 1])), padding=(pads[0], pads[1]),
                        dilation=tuple(a.get("dilations", [1, 1])), groups=a.get("group", 1))


# ---- normalization, softmax, pooling --------------------------------------------------------
@handles("LayerNormalization")
def _layer_norm(cv, node, ins):
    if any(cv.is_used(o) for o in node.output[1:]):
        raise Unsupported("LayerNormalization mean/inv-std outputs are used")
    a = attributes(node)
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    axis = normalize_axis(a.get("axis", -1), x.type.rank)
    normalized = tuple(x.type.shape[axis:])
    for p in (scale, bias):
        if p is not None and (p.type.rank != len(normalized)
                              or not all(dims_equal(u, v) for u, v in zip(p.type.shape, normalized))):
            raise Unsupported("scale or bias shape differs from the normalized shape")
    return cv.op.layer_norm(x, scale, bias, normalized_shape=normalized, eps=float(a.get("epsilon", 1e-5)))


@handles("Softmax")
def _softmax(cv, node, ins):
    return cv.op.softmax(ins[0], dim=attributes(node).get("axis", -1))


@handles("GlobalAveragePool")
def _global_avg_pool(cv, node, ins):
    x = ins[0]
    return cv.op.mean(x, dims=tuple(range(2, x.type.rank)), keepdim=True)


def _reduce_axes(cv, node, ins):
    a = attributes(node)
    if "axes" in a:
        axes = list(a["axes"])
    elif len(node.input) > 1 and node.input[1]:
        axes = cv.concrete_ints(node.input[1])
        if axes is None:
            raise Unsupported("reduction axes computed at run time")
    else:
        axes = []
    return axes, bool(a.get("keepdims", 1)), bool(a.get("noop_with_empty_axes", 0))


@handles("ReduceMean", "ReduceSum", "ReduceMax")
def _reduce(cv, node, ins):
    axes, keepdim, noop = _reduce_axes(cv, node, ins)
    x = ins[0]
    if not axes and noop:
        return x
    ir_op = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "amax"}[node.op_type]
    dims = tuple(normalize_axis(d, x.type.rank) for d in axes) if axes else tuple(range(x.type.rank))
    if ir_op == "mean" and any(x.type.shape[d] == 0 for d in dims):
        raise Unsupported("ReduceMean over an empty axis is undefined in ONNX; ONNX Runtime's value is kept")
    return cv.op(ir_op, x, dims=dims, keepdim=keepdim)
