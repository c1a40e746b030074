"""ONNX lowering of ``acm_gate`` and ``acm`` in standard ai.onnx ops (opset >= 16), for stock ONNX Runtime.

    acm_gate:  k = ArgMax(Slice(MatMul(x, wᵀ) + b, min_k:), axis=-1) + min_k
    acm:       rows flattened to [T, d]; y = zeros [T, m]
               rows with k = N:   idx = NonZero(k == N); the whole MLP on Gather(x, idx), ScatterND into y
               learner i < N:     idx = NonZero(i < k < N); learner i (refitted w2r when there is one) on
                                  Gather(x, idx), ScatterND(reduction="add") into y

The number of rows each learner runs is data-dependent: ``NonZero`` returns a [1, n_i] index tensor
whose n_i only exists at run time, and ``Gather`` / ``MatMul`` / ``ScatterND`` take that size as it
comes (zero rows included), so every learner is one dense GEMM over exactly its rows. Per-learner
weight slices are ``Slice`` nodes on the initializers, which ONNX Runtime folds when the session loads.
"""
from __future__ import annotations

from graphopt.backends import LoweringError
from graphopt.backends.onnx.elementwise import emit_activation
from graphopt.backends.onnx.emitter import register_lowering
from graphopt.ir.ops.acm import GATE, OP, learners


def _transposed(em, node, i, dtype):
    value = node.inputs[i]
    if value.is_constant:
        return em.constant(value, dtype if value.type.dtype != dtype else None, transform="T")
    return em.one("Transpose", [em.input(node, i, dtype)], perm=[1, 0])


def _cols(em, w, lo, hi):
    return em.one("Slice", [w, em.literal([lo]), em.literal([hi]), em.literal([1])])


def _rows(em, w, lo, hi):
    return em.one("Slice", [w, em.literal([lo]), em.literal([hi]), em.literal([0])])


@register_lowering(GATE)
def _acm_gate(em, node):
    dtype = node.inputs[0].type.dtype
    min_k = node.attrs["min_k"]
    logits = em.one("Add", [em.one("MatMul", [em.input(node, 0, dtype), _transposed(em, node, 1, dtype)]),
                            em.input(node, 2, dtype)])
    if not min_k:
        return em.one("ArgMax", [logits], em.out(node), axis=-1, keepdims=0)
    choices = int(node.inputs[1].type.shape[0])
    allowed = em.one("Slice", [logits, em.literal([min_k]), em.literal([choices]), em.literal([-1])])
    return em.one("Add", [em.one("ArgMax", [allowed], axis=-1, keepdims=0), em.literal(min_k)], em.out(node))


@register_lowering(OP)
def _acm(em, node):
    if em.opset < 16:
        raise LoweringError(f"{node.label()}: the acm lowering needs ONNX opset >= 16 (ScatterND with reduction); "
                            f"this export writes opset {em.opset}")
    dtype = node.outputs[0].type.dtype
    splits, activation = node.attrs["splits"], node.attrs["activation"]
    n = len(splits) - 1
    d, m = node.inputs[0].type.shape[-1], node.inputs[4].type.shape[0]
    x2 = em.one("Reshape", [em.input(node, 0, dtype), em.literal([-1, int(d)])])
    k2 = em.one("Reshape", [em.input(node, 1), em.literal([-1])])
    w1t, w2t = _transposed(em, node, 2, dtype), _transposed(em, node, 4, dtype)
    b1, b2 = em.input(node, 3, dtype), em.input(node, 5, dtype)
    gated = len(node.inputs) > 6 and node.inputs[6] is not None
    wgt, bg = (_transposed(em, node, 6, dtype), em.input(node, 7, dtype)) if gated else (None, None)
    refit = len(node.inputs) > 8 and node.inputs[8] is not None
    w2rt = _transposed(em, node, 8, dtype) if refit else w2t
    rows = em.one("Slice", [em.one("Shape", [x2]), em.literal([0]), em.literal([1])])
    y = em.one("ConstantOfShape", [em.one("Concat", [rows, em.literal([int(m)])], axis=0)],
               value=_zero(dtype))

    def hidden(xs, lo, hi):
        up = em.one("Add", [em.one("MatMul", [xs, _cols(em, w1t, lo, hi)]), _slice1(em, b1, lo, hi)])
        if not gated:
            return emit_activation(em, up, activation, dtype)
        g = em.one("Add", [em.one("MatMul", [xs, _cols(em, wgt, lo, hi)]), _slice1(em, bg, lo, hi)])
        return em.one("Mul", [emit_activation(em, g, activation, dtype), up])

    def rows_where(condition):
        index = em.one("Transpose", [em.one("NonZero", [condition])], perm=[1, 0])      # [n_i, 1]
        return index, em.one("GatherND", [x2, index])                                   # [n_i, d]

    full_index, xs = rows_where(em.one("Equal", [k2, em.literal(n)]))
    dense = em.one("Add", [em.one("MatMul", [hidden(xs, 0, splits[-1]), w2t]), b2])
    y = em.one("ScatterND", [y, full_index, dense])
    below_n = em.one("Less", [k2, em.literal(n)])
    for i, (lo, hi) in enumerate(learners(splits)):
        if i == n - 1:
            break  # the last learner runs only where k = N, done above
        index, xs = rows_where(em.one("And", [em.one("Greater", [k2, em.literal(i)]), below_n]))
        out = em.one("MatMul", [hidden(xs, lo, hi), _rows(em, w2rt, lo, hi)])
        if i == 0:
            out = em.one("Add", [out, b2])
        y = em.one("ScatterND", [y, index, out], reduction="add")
    lead = em.one("Slice", [em.one("Shape", [em.input(node, 0)]), em.literal([0]), em.literal([-1])])
    return em.one("Reshape", [y, em.one("Concat", [lead, em.literal([int(m)])], axis=0)], em.out(node))


def _slice1(em, v, lo, hi):
    return em.one("Slice", [v, em.literal([lo]), em.literal([hi]), em.literal([0])])


def _zero(dtype):
    import torch
    from onnx import numpy_helper
    return numpy_helper.from_array(torch.zeros(1, dtype=dtype).numpy())
