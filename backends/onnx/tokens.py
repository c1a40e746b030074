"""ONNX kernels of the token ops (``ir/ops/tokens.py``) and of their integer forms
(``ir/ops/integer_tokens.py``) as standard ai.onnx ops, so stock ONNX Runtime runs merged / pruned
models without a custom-op library; both merges share one matching plan (``bipartite_plan``).

    token_merge      -> ReduceL2/Div, Slice(step 2), MatMul, ReduceMax + ArgMax, TopK, Equal-built
                        one-hot assignment matrix, MatMul (weighted sums), Div
    token_topk_index -> Where, TopK (best k), TopK (ascending order)
    token_gather     -> Expand, Reshape, GatherElements
    int.token_merge  -> floor shift of the keys, integer scores, the same plan, one-hot MatMul merge
                        (int32 when the sums fit), rounded Div: int32/int64 MatMul, Div (truncating, on
                        non-negative operands only) and Where compute the torch reference's integers
    int.lookup       -> Clip + GatherElements
"""
from __future__ import annotations

import sympy
import torch
from onnx import TensorProto

from graphopt.backends.onnx.emitter import register_lowering
from graphopt.ir.onnx_common import INT64_MAX, onnx_dtype
from graphopt.ir.ops.integer_tokens import SCORE_BITS
from graphopt.ir.ops.tokens import EPS, effective_r
from graphopt.ir.types import canonical_dim

ONNX_F32, ONNX_I64 = TensorProto.FLOAT, TensorProto.INT64
I32, I64 = torch.int32, torch.int64


def _reduce(em, op_type, x, axes, keepdims):
    if op_type == "ReduceSum" or em.opset >= 18:
        return em.one(op_type, [x, em.literal(axes)], keepdims=keepdims)
    return em.one(op_type, [x], axes=axes, keepdims=keepdims)


def _range(em, start, count, step=1):
    """int64 [count]: start, start+step, ..."""
    end = canonical_dim(sympy.sympify(start) + sympy.sympify(count) * step)
    return em.one("Range", [em.scalar(start), em.scalar(end), em.literal(step)])


def _slice(em, x, start, end=None, step=1, axis=1):
    end_t = em.literal([INT64_MAX]) if end is None else em.dim1(end)
    return em.one("Slice", [x, em.literal([start]) if isinstance(start, int) else em.dim1(start), end_t,
                            em.literal([axis]), em.literal([step])])


def _rows(em, t, index):
    """GatherElements of whole rows: t[b, index[b, i], :]."""
    shape = em.one("Concat", [em.one("Shape", [index]), em.one("Shape", [t], start=2, end=3)], axis=0)
    idx = em.one("Expand", [em.one("Unsqueeze", [index, em.literal([-1])]), shape])
    return em.one("GatherElements", [t, idx], axis=1)


def bipartite_plan(em, scores: str, n, r: int, p: int):
    """(kept, src_pos, dst_pos) from the A x B scores [B, A, B] (float or integer): the ONNX form of
    ``ir.ops.tokens.plan_from_scores``."""
    m = canonical_dim(sympy.sympify(n) - r)
    node_max = _reduce(em, "ReduceMax", scores, [-1], 0)                                  # [B, na]
    node_idx = em.one("ArgMax", [scores], axis=-1, keepdims=0, select_last_index=0)
    _, src = em.node("TopK", [node_max, em.literal([r])], [em.tmp("topv"), em.tmp("src")], axis=1, largest=1, sorted=1)
    src_pos = em.one("Add", [em.one("Mul", [src, em.literal(2)]), em.literal(p)])           # [B, r]
    partner = em.one("GatherElements", [node_idx, src], axis=1)
    dst_pos = em.one("Add", [em.one("Mul", [partner, em.literal(2)]), em.literal(p + 1)])
    positions = _range(em, 0, n)
    hits = em.one("Equal", [em.one("Unsqueeze", [src_pos, em.literal([-1])]), positions])  # [B, r, N]
    is_src = em.one("Cast", [_reduce(em, "ReduceMax", em.one("Cast", [hits], to=TensorProto.INT32), [1], 0)],
                    to=TensorProto.BOOL)
    key = em.one("Where", [is_src, em.one("Cast", [em.scalar(n)], to=ONNX_F32),
                           em.one("Cast", [positions], to=ONNX_F32)])
    kept_v, _ = em.node("TopK", [key, em.dim1(m)], [em.tmp("keptv"), em.tmp("kepti")], axis=1, largest=0, sorted=1)
    return em.one("Cast", [kept_v], to=ONNX_I64), src_pos, dst_pos                        # kept: [B, N-r]


@register_lowering("token_merge")
def _token_merge(em, node):
    x_t = node.inputs[0].type
    dtype = x_t.dtype
    n = x_t.shape[1]
    p = node.attrs["protected"]
    r = effective_r(n, node.attrs["r"], p)
    x, keys, sizes = em.input(node, 0, dtype), em.input(node, 1, dtype), em.input(node, 2, dtype)
    has_source = len(node.inputs) > 3 and node.inputs[3] is not None
    if r == 0:
        outs = [em.one("Identity", [x], em.out(node, 0)), em.one("Identity", [sizes], em.out(node, 1))]
        if has_source:
            outs.append(em.one("Identity", [em.input(node, 3)], em.out(node, 2)))
        return outs
    # cosine similarity of A (even offsets after the protected prefix) against B (odd offsets)
    norm = em.one("Max", [_reduce(em, "ReduceL2", keys, [-1], 1), em.literal(EPS, dtype)])
    k = em.one("Div", [keys, norm])
    scores = em.one("MatMul", [_slice(em, k, p, None, 2), em.one("Transpose", [_slice(em, k, p + 1, None, 2)], perm=[0, 2, 1])])
    kept, src_pos, dst_pos = bipartite_plan(em, scores, n, r, p)
    onehot = em.one("Cast", [em.one("Equal", [em.one("Unsqueeze", [kept, em.literal([2])]),
                                              em.one("Unsqueeze", [dst_pos, em.literal([1])])])],
                    to=onnx_dtype(dtype))                                                 # [B, N-r, r]

    def merge(t, out=None):
        return em.one("Add", [_rows(em, t, kept), em.one("MatMul", [onehot, _rows(em, t, src_pos)])], out)

    new_sizes = merge(sizes, em.out(node, 1))
    merged = em.one("Div", [merge(em.one("Mul", [x, sizes])), new_sizes], em.out(node, 0))
    outs = [merged, new_sizes]
    if has_source:
        outs.append(merge(em.input(node, 3, dtype), em.out(node, 2)))
    return outs


@register_lowering("token_topk_index")
def _token_topk_index(em, node):
    s_t = node.inputs[0].type
    n = s_t.shape[1]
    a = node.attrs
    scores = em.input(node, 0)
    dtype = s_t.dtype
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        candidates = em.input(node, 1)
        pool = a["num_candidates"]
    else:
        p = a["protected"]
        pos = _range(em, 0, n)
        candidates = em.one("GreaterOrEqual", [pos, em.literal(p)])
        pool = canonical_dim(sympy.sympify(n) - p)
    total = canonical_dim(sympy.sympify(n) - sympy.sympify(pool) + a["k"])
    key = em.one("Where", [candidates, scores, em.literal(float("inf"), dtype)])
    _, best = em.node("TopK", [key, em.dim1(total)], [em.tmp("v"), em.tmp("i")], axis=1, largest=1, sorted=1)
    asc, _ = em.node("TopK", [em.one("Cast", [best], to=ONNX_F32), em.dim1(total)], [em.tmp("asc"), em.tmp("ai")],
                     axis=1, largest=0, sorted=1)
    return em.one("Cast", [asc], em.out(node), to=ONNX_I64)


@register_lowering("token_gather")
def _token_gather(em, node):
    x_t, i_t = node.inputs[0].type, node.inputs[1].type
    axis = node.attrs["axis"] % x_t.rank
    x, index = em.input(node, 0), em.input(node, 1, torch.int64)
    batch = em.one("Shape", [index], start=0, end=1)
    kept = em.one("Shape", [index], start=1, end=2)
    if x_t.shape[0] == 1 and not (i_t.shape[0] == 1):
        rest = em.one("Shape", [x], start=1)
        x = em.one("Expand", [x, em.one("Concat", [batch, rest], axis=0)])
    view = [em.literal([1])] * x_t.rank
    view[0], view[axis] = batch, kept
    idx = em.one("Reshape", [index, em.one("Concat", view, axis=0)])
    target = [em.one("Shape", [x], start=d, end=d + 1) for d in range(x_t.rank)]
    target[0], target[axis] = batch, kept
    idx = em.one("Expand", [idx, em.one("Concat", target, axis=0)])
    return em.one("GatherElements", [x, idx], em.out(node), axis=axis)


# ---- integer token ops -----------------------------------------------------------------------
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
    # GatherElements on the flattened index: ORT's Gather is far slower per element (see integer.py)
    flat = em.one("GatherElements", [em.input(node, 1), em.one("Reshape", [index, em.literal([-1])])], axis=0)
    return em.one("Reshape", [flat, em.one("Shape", [index])], em.out(node))
