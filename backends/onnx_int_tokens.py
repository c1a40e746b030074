"""ONNX lowerings of the integer token ops (``ir/ops/integer_tokens.py``): int64 MatMul, Div
(truncating, on non-negative operands only), Where and the float op's matching plan, so ONNX
Runtime computes the same integers as the torch reference.

    int.token_merge -> floor shift of the keys, integer scores, ``onnx_tokens.bipartite_plan``,
                       one-hot int64 MatMul merge, rounded Div
    int.lookup      -> Clip + GatherElements
"""
from __future__ import annotations

from onnx import TensorProto

from graphopt.backends.onnx_lowering import register_lowering
from graphopt.backends.onnx_tokens import _reduce, _rows, _slice, bipartite_plan
from graphopt.ir.ops.integer_tokens import SCORE_BITS
from graphopt.ir.ops.tokens import effective_r

I32, I64 = TensorProto.INT32, TensorProto.INT64


def _with_sign_of(em, ref: str, mag: str) -> str:
    """-mag where ref < 0, else mag (the Divs computing mag see only non-negative operands, where
    ONNX's truncating integer division is the reference's)."""
    return em.one("Where", [em.one("Less", [ref, em.literal(0)]), em.one("Neg", [mag]), mag])


@register_lowering("int.token_merge")
def _int_token_merge(em, node):
    n = node.inputs[0].type.shape[1]
    p, shift = node.attrs["protected"], node.attrs["shift"]
    r = effective_r(n, node.attrs["r"], p)
    x, sizes = em.input(node, 0), em.input(node, 2)
    if r == 0:
        return [em.one("Identity", [x], em.out(node, 0)), em.one("Identity", [sizes], em.out(node, 1))]
    k = em.one("Cast", [em.input(node, 1)], to=I64)
    if shift:  # floor division by 2^shift (an arithmetic right shift)
        d = 2 ** shift
        k = em.one("Div", [em.one("Sub", [k, em.one("Where", [em.one("Less", [k, em.literal(0)]), em.literal(d - 1),
                                                           em.literal(0)])]), em.literal(d)])
    a, b = _slice(em, k, p, None, 2), _slice(em, k, p + 1, None, 2)
    dot = em.one("MatMul", [a, em.one("Transpose", [b], perm=[0, 2, 1])])
    # clamp each squared norm (< 2^21), not their product: ONNX Runtime 1.31's int64 Max with a scalar
    # returned 1 for products above 2^31
    na = em.one("Max", [_reduce(em, "ReduceSum", em.one("Mul", [a, a]), [-1], 1), em.literal(1)])     # [B, A, 1]
    nb = em.one("Max", [em.one("Unsqueeze", [_reduce(em, "ReduceSum", em.one("Mul", [b, b]), [-1], 0),
                                             em.literal([1])]), em.literal(1)])                        # [B, 1, B]
    den = em.one("Mul", [na, nb])
    num = em.one("Mul", [em.one("Mul", [dot, dot]), em.literal(2 ** SCORE_BITS)])
    scores = _with_sign_of(em, dot, em.one("Div", [num, den]))
    kept, src_pos, dst_pos = bipartite_plan(em, scores, n, r, p)
    onehot = em.one("Cast", [em.one("Equal", [em.one("Unsqueeze", [kept, em.literal([2])]),
                                              em.one("Unsqueeze", [dst_pos, em.literal([1])])])], to=I64)

    def merge(t):
        return em.one("Add", [_rows(em, t, kept), em.one("MatMul", [onehot, _rows(em, t, src_pos)])])

    s = em.one("Cast", [sizes], to=I64)
    new_s = merge(s)
    total = merge(em.one("Mul", [em.one("Cast", [x], to=I64), s]))
    mag = em.one("Div", [em.one("Add", [em.one("Mul", [em.one("Abs", [total]), em.literal(2)]), new_s]),
                         em.one("Mul", [new_s, em.literal(2)])])                          # round half away from 0
    rounded = _with_sign_of(em, total, mag)
    return [em.one("Cast", [rounded], em.out(node, 0), to=I32), em.one("Cast", [new_s], em.out(node, 1), to=I32)]


@register_lowering("int.lookup")
def _lookup(em, node):
    size = node.inputs[1].type.shape[0]
    index = em.one("Clip", [em.one("Cast", [em.input(node, 0)], to=I64), em.literal(0), em.literal(size - 1)])
    # GatherElements on the flattened index: ORT's Gather is far slower per element (see onnx_integer.py)
    flat = em.one("GatherElements", [em.input(node, 1), em.one("Reshape", [index, em.literal([-1])])], axis=0)
    return em.one("Reshape", [flat, em.one("Shape", [index])], em.out(node))
