"""Token-reduction ops: ToMe merging, top-k token selection and per-row token gathers.

    token_merge(x[B,N,C], keys[B,N,d], sizes[B,N,1], source?[B,N,M]; r, protected)
        -> x'[B,N-r,C], sizes'[B,N-r,1] (, source'[B,N-r,M])
    token_topk_index(scores[B,N], candidates?[B,N]; k, protected, num_candidates) -> i64[B,K]
    token_gather(x[b,...,N,...], index[B,K]; axis) -> x[B,...,K,...]

The type rules give token counts as expressions of the input count and the schedule
(``N - r``), so a graph with a symbolic token count keeps a symbolic, schedule-dependent count.
The reference implementations use only operations with a direct ONNX counterpart (sort/TopK,
ArgMax, slicing, Equal-built one-hot matrices and MatMul); there is no scatter in them, and
``backends/onnx/tokens.py`` writes the same computation as standard ONNX ops.
"""
from __future__ import annotations

import sympy
import torch

from graphopt.ir.cost import register_cost
from graphopt.ir.opdef import Attr, OpError, register_op
from graphopt.ir.types import Dim, TensorType, canonical_dim, dims_equal, normalize_axis

EPS = 1e-12


# ---- token counts ---------------------------------------------------------------------------
def effective_r(n: Dim, r: int, protected: int) -> Dim:
    """Tokens merged in one step: ``min(r, (n - protected) // 2)`` (just ``r`` for a symbolic n)."""
    if isinstance(n, int):
        return max(0, min(r, (n - protected) // 2))
    return r


def merged_count(n: Dim, r: int, protected: int) -> Dim:
    return canonical_dim(sympy.sympify(n) - effective_r(n, r, protected))


# ---- token_merge ----------------------------------------------------------------------------
def _token_merge_type(x, keys, sizes, source=None, *, r, protected):
    if x.rank != 3 or keys.rank != 3 or sizes.rank != 3:
        raise OpError(f"token_merge: x {x}, keys {keys} and sizes {sizes} must be [batch, tokens, features]")
    n = x.shape[1]
    if not (dims_equal(keys.shape[1], n) and dims_equal(sizes.shape[1], n)) or not dims_equal(sizes.shape[2], 1):
        raise OpError(f"token_merge: keys {keys} and sizes {sizes} must have the {n} tokens of x {x} (sizes [B,N,1])")
    if r < 0 or protected < 0:
        raise OpError(f"token_merge: r={r} and protected={protected} must be >= 0")
    if source is not None and (source.rank != 3 or not dims_equal(source.shape[1], n)):
        raise OpError(f"token_merge: source {source} must be [batch, {n}, original tokens]")
    m = merged_count(n, r, protected)
    out = [x.with_shape((x.shape[0], m, x.shape[2])), sizes.with_shape((sizes.shape[0], m, 1))]
    if source is not None:
        out.append(source.with_shape((source.shape[0], m, source.shape[2])))
    return tuple(out)


def bipartite_plan(keys: torch.Tensor, r: int, protected: int):
    """The matching of one ToMe step: ``(kept, src_pos, dst_pos)``.

    ``kept[b]``: ascending positions of the tokens that remain (N - r of them); ``src_pos[b, j]``
    the position of the j-th merged-away token and ``dst_pos[b, j]`` the position it merges into.
    Tokens after the ``protected`` prefix alternate between set A (even offsets) and set B (odd
    offsets); each A token's partner is its most similar B token (cosine of the keys, the first
    on ties); the r A tokens with the highest scores merge (ties: the lower position first)."""
    p = protected
    k = keys / keys.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return plan_from_scores(k[:, p::2] @ k[:, p + 1::2].transpose(1, 2), keys.shape[1], r, p)


def plan_from_scores(scores: torch.Tensor, n: int, r: int, p: int):
    """``bipartite_plan`` from the A x B similarity scores [B, A, B] (float or integer)."""
    r = effective_r(n, r, p)
    node_max, node_idx = scores.max(dim=-1)  # first maximum on ties, as ONNX ArgMax
    src = torch.sort(node_max, dim=1, descending=True, stable=True).indices[:, :r]
    src_pos = p + 2 * src
    dst_pos = p + 1 + 2 * torch.gather(node_idx, 1, src)
    positions = torch.arange(n)
    is_src = (src_pos.unsqueeze(-1) == positions).any(dim=1)
    key = torch.where(is_src, torch.tensor(float(n)), positions.to(torch.float32))
    kept = torch.sort(key, dim=1).values[:, : n - r].to(torch.int64)
    return kept, src_pos, dst_pos


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(t, 1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


@register_op("token_merge", inputs=["x", "keys", "sizes", "source?"],
             attrs={"r": Attr("int", doc="tokens merged away (clamped to (tokens - protected) // 2)"),
                    "protected": Attr("int", 0, "leading tokens (CLS, distillation) that never merge")},
             infer=_token_merge_type, tags=["tokens"])
def token_merge(x, keys, sizes, source=None, *, r, protected):
    """ToMe bipartite soft matching + size-weighted merge; the remaining tokens keep their order.

    merged = (x*s)[kept] + M @ (x*s)[src]  /  (s[kept] + M @ s[src]),  M[o, j] = (kept[o] == dst[j])"""
    n = x.shape[1]
    if effective_r(n, r, protected) == 0:
        return (x, sizes) + ((source,) if source is not None else ())
    kept, src_pos, dst_pos = bipartite_plan(keys, r, protected)
    onehot = (kept.unsqueeze(2) == dst_pos.unsqueeze(1)).to(x.dtype)  # [B, N-r, r]
    weighted = x * sizes
    new_sizes = _rows(sizes, kept) + onehot @ _rows(sizes, src_pos)
    merged = (_rows(weighted, kept) + onehot @ _rows(weighted, src_pos)) / new_sizes
    out = (merged, new_sizes)
    if source is not None:
        out += (_rows(source, kept) + onehot @ _rows(source, src_pos),)
    return out


@register_cost("token_merge")
def _token_merge_cost(node, keys=None):
    x, keys = node.inputs[0].type, keys or node.inputs[1].type
    n, c, d = (sympy.sympify(v) for v in (x.shape[1], x.shape[2], keys.shape[2]))
    b = sympy.sympify(x.shape[0])
    m = sympy.sympify(node.outputs[0].type.shape[1])
    r = n - m
    extra = sympy.sympify(node.inputs[3].type.shape[2]) if len(node.inputs) > 3 and node.inputs[3] is not None else 0
    # normalise keys, A x B cosine scores, the src/kept matching, x*s, the one-hot merge matmuls, divide
    return b * (3 * n * d + 2 * (n / 2) * (n / 2) * d + n * r + m * r + n * c
                + 2 * m * r * (c + 1 + extra) + m * (c + 1 + extra) + m * c)


# ---- token_topk_index ------------------------------------------------------------------------
def _topk_index_type(scores, candidates=None, *, k, protected, num_candidates):
    if scores.rank != 2 or not scores.dtype.is_floating_point:
        raise OpError(f"token_topk_index: scores {scores} must be float [batch, tokens]")
    n = scores.shape[1]
    if candidates is not None:
        if candidates.dtype != torch.bool or candidates.rank != 2 or not dims_equal(candidates.shape[1], n):
            raise OpError(f"token_topk_index: candidates {candidates} must be bool [batch, {n}]")
        if num_candidates is None:
            raise OpError("token_topk_index: with a candidates mask, num_candidates (per row) must be given")
        pool = num_candidates
    else:
        pool = canonical_dim(sympy.sympify(n) - protected)
    if k < 1 or (isinstance(pool, int) and k > pool):
        raise OpError(f"token_topk_index: k={k} must be between 1 and the {pool} candidate tokens")
    return TensorType(torch.int64, (scores.shape[0], canonical_dim(sympy.sympify(n) - pool + k)))


@register_op("token_topk_index", inputs=["scores", "candidates?"],
             attrs={"k": Attr("int", doc="candidate tokens to keep"),
                    "protected": Attr("int", 0, "leading tokens always kept (without a candidates mask)"),
                    "num_candidates": Attr("dim", None, "candidate tokens per row (with a candidates mask)")},
             infer=_topk_index_type, tags=["tokens"])
def token_topk_index(scores, candidates=None, *, k, protected, num_candidates):
    """Ascending positions of the kept tokens: every non-candidate, plus the k best-scoring
    candidates (ties: the lower position first)."""
    b, n = scores.shape
    if candidates is None:
        candidates = torch.ones(b, n, dtype=torch.bool)
        candidates[:, :protected] = False
        pool = n - protected
    else:
        pool = int(num_candidates)
    total = n - pool + k
    key = torch.where(candidates, scores, torch.tensor(float("inf"), dtype=scores.dtype))
    best = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :total]
    return torch.sort(best.to(torch.float32), dim=1).values.to(torch.int64)


@register_cost("token_topk_index")
def _topk_cost(node):
    s = node.inputs[0].type
    return 2 * sympy.sympify(s.numel())


# ---- token_gather ---------------------------------------------------------------------------
def _token_gather_type(x, index, *, axis):
    if index.rank != 2 or index.dtype not in (torch.int64, torch.int32):
        raise OpError(f"token_gather: index {index} must be integer [batch, kept]")
    a = normalize_axis(axis, x.rank)
    if a == 0:
        raise OpError("token_gather: axis 0 is the batch axis")
    b = index.shape[0]
    if not (x.shape[0] == 1 or dims_equal(x.shape[0], b)):
        raise OpError(f"token_gather: batch of {x} does not fit index {index}")
    shape = list(x.shape)
    shape[0], shape[a] = b, index.shape[1]
    return x.with_shape(shape)


@register_op("token_gather", inputs=["x", "index"], attrs={"axis": Attr("int")}, infer=_token_gather_type,
             tags=["tokens"])
def token_gather(x, index, *, axis):
    """out[b, ..., i, ...] = x[b, ..., index[b, i], ...] along ``axis`` (a batch-1 x is broadcast)."""
    b, k = index.shape
    a = axis % x.dim()
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    view = [1] * x.dim()
    view[0], view[a] = b, k
    target = list(x.shape)
    target[a] = k
    return torch.gather(x, a, index.reshape(view).expand(target))


@register_cost("token_gather")
def _token_gather_cost(node):
    return sympy.Integer(0)
