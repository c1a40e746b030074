"""ONNX kernels of the shape IR ops: reshape, permute, expand, cat, slicing and indexing, ranges and
filled tensors. Symbolic target shapes keep the dims of the source a reshape can copy (``0``) and
leave one ``-1``; only what remains is computed from the input sizes (``dims.py``).
"""
from __future__ import annotations

import torch

from graphopt.backends.onnx.emitter import out_dtype, register_lowering
from graphopt.ir.onnx_common import INT64_MAX, tensor_to_proto
from graphopt.ir.ops.shape import BIG
from graphopt.ir.types import dims_equal


@register_lowering("reshape")
def _reshape(em, node):
    x = node.inputs[0]
    target = list(node.attrs["shape"])
    source = list(x.type.shape)
    if any(isinstance(d, int) and d == 0 for d in target):
        return em.one("Reshape", [em.input(node, 0), em.dims(target)], em.out(node), allowzero=1)
    spec: list = []
    for i, d in enumerate(target):
        if isinstance(d, int):
            spec.append(d)
        elif i < len(source) and dims_equal(source[i], d):
            spec.append(0)
        else:
            spec.append(d)
    symbolic = [i for i, d in enumerate(spec) if not isinstance(d, int)]
    if len(symbolic) == 1 and -1 not in spec:
        spec[symbolic[0]] = -1
    return em.one("Reshape", [em.input(node, 0), em.dims(spec)], em.out(node))


@register_lowering("permute")
def _permute(em, node):
    return em.one("Transpose", [em.input(node, 0)], em.out(node), perm=list(node.attrs["dims"]))


@register_lowering("expand")
def _expand(em, node):
    x = node.inputs[0]
    target = list(node.attrs["shape"])
    lead = len(target) - x.type.rank
    spec = []
    for i, d in enumerate(target):
        src = x.type.shape[i - lead] if i >= lead else None
        if isinstance(d, int) and d == -1:
            spec.append(1)
        elif src is not None and not isinstance(d, int) and dims_equal(src, d):
            spec.append(1)
        else:
            spec.append(d)
    return em.one("Expand", [em.input(node, 0), em.dims(spec)], em.out(node))


@register_lowering("cat")
def _cat(em, node):
    dtype = out_dtype(node)
    return em.one("Concat", [em.input(node, i, dtype) for i in range(len(node.inputs))], em.out(node),
                  axis=node.attrs["dim"])


def bound(em, d):
    """A slice bound as a 1-D int64 tensor (torch's 'to the end' sentinels become INT64_MAX)."""
    if isinstance(d, int):
        return em.literal([min(d, INT64_MAX) if d < BIG else INT64_MAX])
    return em.dim1(d)


@register_lowering("slice")
def _slice(em, node):
    a = node.attrs
    return em.one("Slice", [em.input(node, 0), bound(em, a["start"]), bound(em, a["end"]),
                            em.literal([a["dim"]]), em.literal([a["step"]])], em.out(node))


@register_lowering("select")
def _select(em, node):
    index = node.attrs["index"]
    return em.one("Gather", [em.input(node, 0), em.scalar(index)], em.out(node), axis=node.attrs["dim"])


@register_lowering("gather")
def _gather(em, node):
    return em.one("GatherElements", [em.input(node, 0), em.input(node, 1, torch.int64)], em.out(node),
                  axis=node.attrs["dim"])


@register_lowering("index_select")
def _index_select(em, node):
    return em.one("Gather", [em.input(node, 0), em.input(node, 1)], em.out(node), axis=node.attrs["dim"])


@register_lowering("arange")
def _arange(em, node):
    a = node.attrs
    dtype = a["dtype"]
    return em.one("Range", [em.scalar(a["start"], dtype), em.scalar(a["end"], dtype), em.literal(a["step"], dtype)],
                  em.out(node))


@register_lowering("full")
def _full(em, node):
    a = node.attrs
    dtype = a["dtype"]
    value = tensor_to_proto(torch.tensor([a["value"]], dtype=dtype), "value")
    return em.one("ConstantOfShape", [em.dims(list(a["shape"]))], em.out(node), value=value)
