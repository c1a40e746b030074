"""Neural-network ops: linear, matmul, conv2d, norms, softmax, attention, embedding, reductions."""
from __future__ import annotations

import sympy
import torch
import torch.nn.functional as F

from graphopt.ir.opdef import Attr, OpError, register_op
from graphopt.ir.ops.rules import broadcast_shapes, reduce_shape, result_dtype, same_as_input
from graphopt.ir.types import TensorType, canonical_dim, dims_equal, normalize_axis


def _linear_type(x, weight, bias=None):
    if weight.rank != 2 or x.rank < 1 or not dims_equal(x.shape[-1], weight.shape[1]):
        raise OpError(f"linear: input {x} does not fit weight {weight} (expects [..., in] and [out, in])")
    if bias is not None and (bias.rank != 1 or not dims_equal(bias.shape[0], weight.shape[0])):
        raise OpError(f"linear: bias {bias} does not fit weight {weight}")
    return TensorType(result_dtype(x, weight), x.shape[:-1] + (weight.shape[0],))


@register_op("linear", inputs=["x", "weight", "bias?"], infer=_linear_type, tags=["gemm"])
def linear(x, weight, bias=None):
    """y = x @ weight.T + bias"""
    return F.linear(x, weight, bias)


def _matmul_type(a, b):
    if a.rank == 0 or b.rank == 0:
        raise OpError("matmul: scalars are not allowed")
    a_shape = (1,) + a.shape if a.rank == 1 else a.shape
    b_shape = b.shape + (1,) if b.rank == 1 else b.shape
    if not dims_equal(a_shape[-1], b_shape[-2]):
        raise OpError(f"matmul: {a} @ {b}: inner dims differ")
    batch = broadcast_shapes(a_shape[:-2], b_shape[:-2])
    out = batch + ((a_shape[-2],) if a.rank > 1 else ()) + ((b_shape[-1],) if b.rank > 1 else ())
    return TensorType(result_dtype(a, b), out)


@register_op("matmul", inputs=["a", "b"], infer=_matmul_type, tags=["gemm"])
def matmul(a, b):
    return torch.matmul(a, b)


def _conv_out(size, k, s, p, d):
    if isinstance(size, int):
        return (size + 2 * p - d * (k - 1) - 1) // s + 1
    return canonical_dim(sympy.floor((sympy.sympify(size) + 2 * p - d * (k - 1) - 1) / s) + 1)


def _conv2d_type(x, weight, bias=None, *, stride, padding, dilation, groups):
    if x.rank != 4 or weight.rank != 4:
        raise OpError(f"conv2d: expects NCHW input and OIHW weight, got {x} and {weight}")
    if not dims_equal(x.shape[1], sympy.sympify(weight.shape[1]) * groups):
        raise OpError(f"conv2d: {x} has {x.shape[1]} channels, weight {weight} with groups={groups} expects {weight.shape[1]}*{groups}")
    h = _conv_out(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    w = _conv_out(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return TensorType(result_dtype(x, weight), (x.shape[0], weight.shape[0], h, w))


@register_op("conv2d", inputs=["x", "weight", "bias?"],
             attrs={"stride": Attr("ints", (1, 1)), "padding": Attr("ints", (0, 0)),
                    "dilation": Attr("ints", (1, 1)), "groups": Attr("int", 1)},
             infer=_conv2d_type, tags=["gemm"])
def conv2d(x, weight, bias=None, *, stride, padding, dilation, groups):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _layer_norm_type(x, weight=None, bias=None, *, normalized_shape, eps):
    n = len(normalized_shape)
    if n > x.rank or any(not dims_equal(a, b) for a, b in zip(x.shape[x.rank - n:], normalized_shape)):
        raise OpError(f"layer_norm: {x} does not end in {list(normalized_shape)}")
    return x


@register_op("layer_norm", inputs=["x", "weight?", "bias?"],
             attrs={"normalized_shape": Attr("shape"), "eps": Attr("float", 1e-5)},
             infer=_layer_norm_type, tags=["norm"])
def layer_norm(x, weight=None, bias=None, *, normalized_shape, eps):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def _softmax_type(x, *, dim):
    normalize_axis(dim, x.rank)
    return x


@register_op("softmax", inputs=["x"], attrs={"dim": Attr("int")}, infer=_softmax_type)
def softmax(x, *, dim):
    return torch.softmax(x, dim)


def _sdpa_type(q, k, v, mask=None, *, is_causal, scale):
    if q.rank < 2 or k.rank != q.rank or v.rank != q.rank:
        raise OpError(f"sdpa: q {q}, k {k}, v {v} must share a rank of at least 2")
    if not dims_equal(q.shape[-1], k.shape[-1]) or not dims_equal(k.shape[-2], v.shape[-2]):
        raise OpError(f"sdpa: q {q}, k {k}, v {v} have mismatched head or key dims")
    if mask is not None:
        broadcast_shapes(mask.shape, q.shape[:-1] + (k.shape[-2],))
    return q.with_shape(broadcast_shapes(q.shape[:-2], v.shape[:-2]) + (q.shape[-2], v.shape[-1]))


@register_op("sdpa", inputs=["q", "k", "v", "mask?"],
             attrs={"is_causal": Attr("bool", False), "scale": Attr("float", None, "default 1/sqrt(head size)")},
             infer=_sdpa_type, tags=["attention"])
def sdpa(q, k, v, mask=None, *, is_causal, scale):
    """softmax(q @ k^T * scale + mask) @ v; a bool mask keeps the True positions."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def _embedding_type(weight, indices):
    if weight.rank != 2 or indices.dtype not in (torch.int64, torch.int32):
        raise OpError(f"embedding: weight {weight} must be 2-D and indices {indices} integer")
    return weight.with_shape(indices.shape + (weight.shape[1],))


@register_op("embedding", inputs=["weight", "indices"], infer=_embedding_type)
def embedding(weight, indices):
    return F.embedding(indices, weight)


def _reduce_type(x, *, dims, keepdim, dtype=None):
    out = x.with_shape(reduce_shape(x, dims, keepdim))
    return out.with_dtype(dtype) if dtype is not None else out


_REDUCE_ATTRS = {"dims": Attr("ints", (), "axes to reduce; empty means all"), "keepdim": Attr("bool", False)}


@register_op("mean", inputs=["x"], attrs={**_REDUCE_ATTRS, "dtype": Attr("dtype", None)}, infer=_reduce_type, tags=["reduce"])
def mean(x, *, dims, keepdim, dtype):
    return torch.mean(x, dim=list(dims) or None, keepdim=keepdim, dtype=dtype)


def _sum_type(x, *, dims, keepdim, dtype=None):
    t = _reduce_type(x, dims=dims, keepdim=keepdim, dtype=dtype)
    return t if dtype is not None or x.dtype.is_floating_point else t.with_dtype(torch.int64)


@register_op("sum", inputs=["x"], attrs={**_REDUCE_ATTRS, "dtype": Attr("dtype", None)}, infer=_sum_type, tags=["reduce"])
def sum_(x, *, dims, keepdim, dtype):
    return torch.sum(x, dim=list(dims) or None, keepdim=keepdim, dtype=dtype)


@register_op("amax", inputs=["x"], attrs=_REDUCE_ATTRS, infer=_reduce_type, tags=["reduce"])
def amax(x, *, dims, keepdim):
    """Over an empty axis the maximum is the lowest value (as in ONNX), where torch raises."""
    if x.numel() == 0 and any(x.shape[d] == 0 for d in (dims or range(x.dim()))):
        shape = reduce_shape(TensorType.of(x), dims, keepdim)
        lowest = False if x.dtype is torch.bool else -torch.inf if x.dtype.is_floating_point else torch.iinfo(x.dtype).min
        return torch.full(shape, lowest, dtype=x.dtype)
    return torch.amax(x, dim=list(dims), keepdim=keepdim)
