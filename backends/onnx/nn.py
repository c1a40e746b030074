"""ONNX kernels of the network IR ops: matmul / linear / conv2d, normalisation, softmax and
attention, embedding lookup, reductions.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from onnx import helper

from graphopt.backends.onnx.elementwise import one_op
from graphopt.backends.onnx.emitter import out_dtype, register_lowering
from graphopt.ir.onnx_common import onnx_dtype

register_lowering("matmul")(one_op("MatMul"))


@register_lowering("linear")
def _linear(em, node):
    dtype = out_dtype(node)
    x, w = node.inputs[0], node.inputs[1]
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    if x.type.rank == 2 and dtype.is_floating_point:
        inputs = [em.input(node, 0, dtype), em.input(node, 1, dtype)] + ([em.input(node, 2, dtype)] if has_bias else [])
        return em.one("Gemm", inputs, em.out(node), transB=1)
    if w.is_constant:
        wt = em.constant(w, dtype if w.type.dtype != dtype else None, transform="T")
    else:
        wt = em.one("Transpose", [em.input(node, 1, dtype)], perm=[1, 0])
    if not has_bias:
        return em.one("MatMul", [em.input(node, 0, dtype), wt], em.out(node))
    y = em.one("MatMul", [em.input(node, 0, dtype), wt])
    return em.one("Add", [y, em.input(node, 2, dtype)], em.out(node))


@register_lowering("conv2d")
def _conv2d(em, node):
    dtype = out_dtype(node)
    a = node.attrs
    w = node.inputs[1]
    inputs = [em.input(node, 0, dtype), em.input(node, 1, dtype)]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        inputs.append(em.input(node, 2, dtype))
    kernel = list(w.type.shape[2:]) if all(isinstance(d, int) for d in w.type.shape[2:]) else None
    return em.one("Conv", inputs, em.out(node), strides=list(a["stride"]), dilations=list(a["dilation"]),
                  pads=[a["padding"][0], a["padding"][1], a["padding"][0], a["padding"][1]], group=a["groups"],
                  kernel_shape=kernel)


def reduce_mean(em, x, axes, keepdims, out=None):
    """ReduceMean over ``axes`` (an input from opset 18, an attribute before)."""
    if em.opset >= 18:
        return em.one("ReduceMean", [x, em.literal(axes)], out, keepdims=keepdims)
    return em.one("ReduceMean", [x], out, axes=axes, keepdims=keepdims)


@register_lowering("layer_norm")
def _layer_norm(em, node):
    dtype = out_dtype(node)
    x = node.inputs[0]
    shape = node.attrs["normalized_shape"]
    eps = node.attrs["eps"]
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    n = len(shape)
    if em.opset >= 17:
        if weight is not None:
            scale = em.value(weight, dtype)
        elif all(isinstance(d, int) for d in shape):
            scale = em.literal(np.ones(shape).tolist(), dtype, shape=shape)
        else:
            one = helper.make_tensor("value", onnx_dtype(dtype), [1], [1])
            scale = em.one("ConstantOfShape", [em.dims(shape)], value=one)
        inputs = [em.value(x, dtype), scale] + ([em.value(bias, dtype)] if bias is not None else [])
        return em.node("LayerNormalization", inputs, [em.out(node)], axis=-n, epsilon=eps)[0]
    xv = em.value(x, dtype)
    axes = list(range(-n, 0))
    centered = em.one("Sub", [xv, reduce_mean(em, xv, axes, 1)])
    var = reduce_mean(em, em.one("Mul", [centered, centered]), axes, 1)
    y = em.one("Div", [centered, em.one("Sqrt", [em.one("Add", [var, em.literal(eps, dtype)])])])
    if weight is not None:
        y = em.one("Mul", [y, em.value(weight, dtype)])
    if bias is not None:
        y = em.one("Add", [y, em.value(bias, dtype)])
    return em.one("Identity", [y], em.out(node))


@register_lowering("softmax")
def _softmax(em, node):
    return em.one("Softmax", [em.input(node, 0, out_dtype(node))], em.out(node), axis=node.attrs["dim"])


def _scale_known(node) -> str | None:
    head = node.inputs[0].type.shape[-1]
    if node.attrs["scale"] is None and not isinstance(head, int):
        return f"a symbolic head size {head} needs an explicit scale"
    return None


@register_lowering("sdpa", supports=_scale_known)
def _sdpa(em, node):
    dtype = out_dtype(node)
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    scale = node.attrs["scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(q.type.shape[-1])
    rank = k.type.rank
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    kt = em.one("Transpose", [em.value(k, dtype)], perm=perm)
    scores = em.one("Mul", [em.one("MatMul", [em.value(q, dtype), kt]), em.literal(scale, dtype)])
    neg_inf = em.literal(float("-inf"), dtype)
    if node.attrs["is_causal"]:
        L, S = q.type.shape[-2], k.type.shape[-2]
        if isinstance(L, int) and isinstance(S, int):
            keep = em.literal(torch.ones(L, S, dtype=torch.bool).tril().tolist(), torch.bool, shape=[L, S])
        else:  # key position <= query position, from two ranges (no Trilu: it needs opset 14)
            zero, step = em.literal(0), em.literal(1)
            rows = em.one("Unsqueeze", [em.one("Range", [zero, em.scalar(L), step]), em.literal([1])])
            cols = em.one("Unsqueeze", [em.one("Range", [zero, em.scalar(S), step]), em.literal([0])])
            keep = em.one("LessOrEqual", [cols, rows])
        scores = em.one("Where", [keep, scores, neg_inf])
    if mask is not None:
        if mask.type.dtype is torch.bool:
            # one Where per distinct mask makes it additive (0 / -inf); every layer then pays a broadcast
            # Add instead of a Where over all its heads' scores (ONNX Runtime's Where is ~10x slower per element)
            key = ("additive_mask", id(mask), dtype)
            if key not in em.cache:
                em.cache[key] = em.one("Where", [em.value(mask), em.literal(0.0, dtype), neg_inf])
            scores = em.one("Add", [scores, em.cache[key]])
        else:
            scores = em.one("Add", [scores, em.value(mask, dtype)])
    probs = em.one("Softmax", [scores], axis=-1)
    return em.one("MatMul", [probs, em.value(v, dtype)], em.out(node))


@register_lowering("embedding")
def _embedding(em, node):
    return em.one("Gather", [em.input(node, 0), em.input(node, 1)], em.out(node), axis=0)


def _reduce(op_type):
    def lower(em, node):
        dtype = out_dtype(node)
        x = em.input(node, 0, dtype)
        dims = list(node.attrs["dims"])
        keep = int(node.attrs["keepdim"])
        axes_as_input = op_type == "ReduceSum" or em.opset >= 18
        if not dims:
            return em.one(op_type, [x], em.out(node), keepdims=keep)
        if axes_as_input:
            return em.one(op_type, [x, em.literal(dims)], em.out(node), keepdims=keep)
        return em.one(op_type, [x], em.out(node), axes=dims, keepdims=keep)
    return lower


register_lowering("mean")(_reduce("ReduceMean"))
register_lowering("sum")(_reduce("ReduceSum"))
register_lowering("amax")(_reduce("ReduceMax"))

