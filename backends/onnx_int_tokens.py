"""ONNX lowerings of the integer token ops (``ir/ops/integer_tokens.py``): int32/int64 MatMul, Div
(truncating, on non-negative operands only), Where and the float op's matching plan, so ONNX
Runtime computes the same integers as the torch reference.

    int.token_merge -> floor shift of the keys, integer scores, ``onnx_tokens.bipartite_plan``,
                       one-hot MatMul merge (int32 when the sums fit), rounded Div
    int.lookup      -> Clip + GatherElements
"""
from __future__ import annotations

import torch

from graphopt.backends.onnx_lowering import register_lowering
from graphopt.backends.onnx_tokens import _reduce, _rows, _slice, bipartite_plan
from graphopt.ir.onnx_common import onnx_dtype
from graphopt.ir.ops.integer_tokens import SCORE_BITS
from graphopt.ir.ops.tokens import effective_r

I32, I64 = torch.int32, torch.int64


def _with_sign_of(em, ref: str, mag: str, zero: str | None = None) -> str:
    """-mag where ref < 0, else mag (the Divs computing mag see only non-negative operands, where
    ONNX's truncating integer division is the reference's). ``zero``: a 0 of ref's type (default int64)."""
    return em.one("Where", [em.one("Less", [ref, zero or em.literal(0)]), em.one("Neg", [mag]), mag])


def _sums_fit_int32(node) -> bool:
    """The size-weighted sums of x fit int32: sizes start at 1 (a ``full``), so a merged sum is at most
    max|x| times the original token count (ONNX Runtime's int32 MatMul is ~3x faster than int64)."""
    src = node.inputs[0].producer
    if src is None or src.op not in ("int.add", "int.requant") or src.attrs["dtype"] != "i32":
        return False
    zp = src.attrs["zero_point"]
    x_max = max(abs(src.attrs["lo"] + zp), abs(src.attrs["hi"] + zp))
    sizes = node.inputs[2]
    while sizes.producer is not None and sizes.producer.op == "int.token_merge":
        sizes = sizes.producer.inputs[2]
    root, tokens = sizes.producer, sizes.type.shape[1]
    return (root is not None and root.op == "full" and root.attrs["value"] == 1 and isinstance(tokens, int)
            and 2 * x_max * tokens + tokens < 2 ** 31)


@register_lowering("int.token_merge")
def _int_token_merge(em, node):
    n = node.inputs[0].type.shape[1]
    p, shift = node.attrs["protected"], node.attrs["shift"]
    r = effective_r(n, node.attrs["r"], p)
    x, sizes = em.input(node, 0), em.input(node, 2)
    if r == 0:
        return [em.one("Identity", [x], em.out(node, 0)), em.one("Identity", [sizes], em.out(node, 1))]
    # the pass keeps head_size * (max|k| >> shift)^2 < 2^21: dot products and squared norms are exact in int32
    k = em.one("Cast", [em.input(node, 1)], to=onnx_dtype(I32))
    if shift:  # floor division by 2^shift (an arithmetic right shift)
        d = 2 ** shift
        k = em.one("Div", [em.one("Sub", [k, em.one("Where", [em.one("Less", [k, em.literal(0, I32)]),
                                                           em.literal(d - 1, I32), em.literal(0, I32)])]),
                           em.literal(d, I32)])
    a, b = _slice(em, k, p, None, 2), _slice(em, k, p + 1, None, 2)
    dot = em.one("Cast", [em.one("MatMul", [a, em.one("Transpose", [b], perm=[0, 2, 1])])], to=onnx_dtype(I64))
    # clamp each squared norm (< 2^21), not their product: ONNX Runtime 1.31's int64 Max with a scalar
    # returned 1 for products above 2^31
    one = em.literal(1, I32)
    na = em.one("Max", [_reduce(em, "ReduceSum", em.one("Mul", [a, a]), [-1], 1), one])                # [B, A, 1]
    nb = em.one("Max", [em.one("Unsqueeze", [_reduce(em, "ReduceSum", em.one("Mul", [b, b]), [-1], 0),
                                             em.literal([1])]), one])                                    # [B, 1, B]
    den = em.one("Mul", [em.one("Cast", [na], to=onnx_dtype(I64)), em.one("Cast", [nb], to=onnx_dtype(I64))])
    num = em.one("Mul", [em.one("Mul", [dot, dot]), em.literal(2 ** SCORE_BITS)])
    scores = _with_sign_of(em, dot, em.one("Div", [num, den]))
    kept, src_pos, dst_pos = bipartite_plan(em, scores, n, r, p)
    wide = I32 if _sums_fit_int32(node) else I64
    onehot = em.one("Cast", [em.one("Equal", [em.one("Unsqueeze", [kept, em.literal([2])]),
                                              em.one("Unsqueeze", [dst_pos, em.literal([1])])])], to=onnx_dtype(wide))

    def merge(t):
        return em.one("Add", [_rows(em, t, kept), em.one("MatMul", [onehot, _rows(em, t, src_pos)])])

    s = em.one("Cast", [sizes], to=onnx_dtype(wide))
    new_s = merge(s)
    total = merge(em.one("Mul", [em.one("Cast", [x], to=onnx_dtype(wide)), s]))
    two = em.literal(2, wide)
    mag = em.one("Div", [em.one("Add", [em.one("Mul", [em.one("Abs", [total]), two]), new_s]),
                         em.one("Mul", [new_s, two])])                                   # round half away from 0
    rounded = _with_sign_of(em, total, mag, em.literal(0, wide))
    return [em.one("Cast", [rounded], em.out(node, 0), to=onnx_dtype(I32)),
            em.one("Cast", [new_s], em.out(node, 1), to=onnx_dtype(I32))]


@register_lowering("int.lookup")
def _lookup(em, node):
    size = node.inputs[1].type.shape[0]
    index = em.one("Clip", [em.one("Cast", [em.input(node, 0)], to=onnx_dtype(I64)), em.literal(0),
                            em.literal(size - 1)])
    # GatherElements on the flattened index: ORT's Gather is far slower per element (see onnx_integer.py)
    flat = em.one("GatherElements", [em.input(node, 1), em.one("Reshape", [index, em.literal([-1])])], axis=0)
    return em.one("Reshape", [flat, em.one("Shape", [index])], em.out(node))
