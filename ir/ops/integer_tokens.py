"""Integer ToMe: the token merge of ``tokens.token_merge`` inside an integer-only graph.

    int.token_merge(x i32[B,N,C], keys int[B,N,d], sizes i32[B,N,1]; r, protected, shift)
        -> x' i32[B,N-r,C], sizes' i32[B,N-r,1]
    int.lookup(x int, table int[V]) -> table[clamp(x, 0, V-1)]

The matching is the float op's with the cosine replaced by an exact integer score: keys are
shifted right by ``shift`` (chosen by the pass so that d * max|k|^2 < 2^21), and
``score = sign(dot) * tdiv(dot^2 * 2^20, |a|^2 |b|^2)`` (int64) orders pairs as the signed square
of the cosine does. Merged tokens are size-weighted means rounded half away from zero, so x keeps
its scale and bound; sizes are exact counts. ``int.lookup`` turns sizes into the integer
log(size) bias of proportional attention. Every backend computes the same integers.
"""
from __future__ import annotations

import torch

from graphopt.ir.cost import register_cost, register_elementwise_cost
from graphopt.ir.opdef import Attr, OpError, register_op
from graphopt.ir.ops.integer import tdiv
from graphopt.ir.ops.tokens import _rows, _token_merge_cost, _token_merge_type, effective_r, plan_from_scores

I32, I64 = torch.int32, torch.int64
INT = (torch.int8, torch.uint8, torch.int32, torch.int64)
SCORE_BITS = 20


def _int_token_merge_type(x, keys, sizes, *, r, protected, shift):
    if x.dtype != I32 or sizes.dtype != I32 or keys.dtype not in INT:
        raise OpError(f"int.token_merge: x {x} and sizes {sizes} must be int32 and keys {keys} an integer "
                      "tensor; run token_merge before integer_only, or on the integer graph it produced")
    return _token_merge_type(x, keys, sizes, r=r, protected=protected)


def integer_scores(keys: torch.Tensor, protected: int, shift: int) -> torch.Tensor:
    """sign(a.b) (a.b)^2 2^20 / (|a|^2 |b|^2) for A = even, B = odd offsets after the prefix (int64)."""
    k = torch.bitwise_right_shift(keys.to(I64), shift)
    a, b = k[:, protected::2], k[:, protected + 1::2]
    dot = a @ b.transpose(1, 2)
    den = (a * a).sum(-1, keepdim=True).clamp_min(1) * (b * b).sum(-1).unsqueeze(1).clamp_min(1)
    mag = tdiv(dot * dot * 2 ** SCORE_BITS, den)
    return torch.where(dot < 0, -mag, mag)


@register_op("int.token_merge", inputs=["x", "keys", "sizes"],
             attrs={"r": Attr("int", doc="tokens merged away (clamped to (tokens - protected) // 2)"),
                    "protected": Attr("int", 0, "leading tokens (CLS, distillation) that never merge"),
                    "shift": Attr("int", 0, "right shift of the keys before scoring (keeps int64 exact)")},
             infer=_int_token_merge_type, tags=["integer", "tokens"])
def int_token_merge(x, keys, sizes, *, r, protected, shift):
    """Integer ToMe step: merged = round((x*s)[kept] + M @ (x*s)[src]) / (s[kept] + M @ s[src])),
    M[o, j] = (kept[o] == dst[j]); the remaining tokens keep their order."""
    n = x.shape[1]
    if effective_r(n, r, protected) == 0:
        return x, sizes
    kept, src_pos, dst_pos = plan_from_scores(integer_scores(keys, protected, shift), n, r, protected)
    onehot = (kept.unsqueeze(2) == dst_pos.unsqueeze(1)).to(I64)
    s = sizes.to(I64)
    xs = x.to(I64) * s
    new_s = _rows(s, kept) + onehot @ _rows(s, src_pos)
    num = _rows(xs, kept) + onehot @ _rows(xs, src_pos)
    mag = tdiv(2 * num.abs() + new_s, 2 * new_s)
    return torch.where(num < 0, -mag, mag).to(I32), new_s.to(I32)


register_cost("int.token_merge")(_token_merge_cost)


def _lookup_type(x, table):
    if x.dtype not in INT or table.dtype not in INT or table.rank != 1:
        raise OpError(f"int.lookup: x {x} must be integer and table {table} a 1-D integer tensor")
    return x.with_dtype(table.dtype)


@register_op("int.lookup", inputs=["x", "table"], infer=_lookup_type, tags=["integer"])
def lookup(x, table):
    """table[x], indices clamped to the table (a function of a small integer domain, e.g. log(size))."""
    return table[x.to(I64).clamp(0, table.shape[0] - 1)]


register_elementwise_cost(1, "int.lookup")
