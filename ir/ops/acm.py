"""Adaptive Computation Module ops (Wójcik et al., AAAI 2025): ``acm_gate`` and ``acm``.

    k = acm_gate(x[..., d], w[N+1, d], b[N+1]; min_k)          k = min_k + argmax((x wᵀ + b)[..., min_k:])
    y = acm(x[..., d], k[...], w1[H, d], b1[H], w2[m, H], b2[m], wg?[H, d], bg?[H], w2r?[m, H];
            splits, activation)

The hidden width H is cut into N ordered learners at ``splits`` (N + 1 boundaries, 0 .. H). Learner
i is the slice ``splits[i]:splits[i+1]`` of the MLP's hidden neurons: ``L_i(x) = act(x w1_iᵀ + b1_i)
w2_iᵀ`` (gated MLPs: ``act(x wg_iᵀ + bg_i) * (x w1_iᵀ + b1_i)``); the output bias ``b2`` belongs to
learner 0. A row with choice k gets ``sum_{i<k} L_i(x)``: k = N is the original MLP, k = 0 is zero
(the block's residual stream alone). ``w2r`` (optional) are output weights refitted for truncated
prefixes: rows with k < N use them, rows with k = N the original ``w2``, so k = N stays exact.
With ``activation="none"`` and no ``wg`` a learner is a factor pair (an ACM over a projection).

The reference below is the masked per-learner loop (every learner on every row, masked by k > i):
obviously right, not fast. Fast kernels sort rows by k so learner i is one dense GEMM over the
contiguous block of rows with k > i: ``backends/acm_kernels.py`` (CPU, the torch backend's kernel),
``backends/triton_acm.py`` and the ONNX lowering ``backends/onnx/acm.py``.

Token counts per learner are data-dependent: the pass stores the calibrated fraction of rows that
run each learner (``fractions``) and the cost formula charges that expected amount.
"""
from __future__ import annotations

import sympy
import torch

from graphopt.ir.cost import register_cost
from graphopt.ir.opdef import Attr, OpError, register_op
from graphopt.ir.ops.low_rank import ACTIVATIONS, activate
from graphopt.ir.types import TensorType, dims_equal

GATE = "acm_gate"
OP = "acm"


# ---- acm_gate ---------------------------------------------------------------------------------
def _gate_type(x, w, b, *, min_k):
    if w.rank != 2 or not dims_equal(w.shape[1], x.shape[-1]):
        raise OpError(f"{GATE}: weight {w} does not fit x {x} (expected [N+1, {x.shape[-1]}])")
    if b.rank != 1 or not dims_equal(b.shape[0], w.shape[0]):
        raise OpError(f"{GATE}: bias {b} does not fit weight {w}")
    if not isinstance(w.shape[0], int) or not 0 <= min_k < w.shape[0]:
        raise OpError(f"{GATE}: min_k={min_k} must be in [0, N] for N + 1 = {w.shape[0]} choices")
    return TensorType(torch.int64, x.shape[:-1])


def gate_choice(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, min_k: int) -> torch.Tensor:
    """k per row: the first maximum of the gate's logits over the allowed choices (rows flattened,
    so every implementation computes the same logits)."""
    x2 = x.reshape(-1, x.shape[-1])
    logits = torch.addmm(b, x2, w.t())[:, min_k:]
    return (logits.argmax(-1) + min_k).reshape(x.shape[:-1])


@register_op(GATE, inputs=["x", "w", "b"],
             attrs={"min_k": Attr("int", 0, "smallest allowed choice (1 where the module has no residual bypass)")},
             infer=_gate_type, tags=["gemm"])
def acm_gate(x, w, b, *, min_k):
    """How many learners each row runs: argmax of a linear classifier over k = min_k .. N."""
    return gate_choice(x, w, b, min_k)


@register_cost(GATE)
def _gate_cost(node):
    x, w = node.inputs[0].type, node.inputs[1].type
    rows = sympy.sympify(x.numel()) / sympy.sympify(x.shape[-1])
    return rows * (2 * sympy.sympify(w.shape[1]) + 2) * sympy.sympify(w.shape[0])


# ---- acm --------------------------------------------------------------------------------------
def _acm_type(x, k, w1, b1, w2, b2, wg=None, bg=None, w2r=None, *, splits, activation, fractions):
    if activation not in ACTIVATIONS:
        raise OpError(f"{OP}: activation {activation!r} is not one of {ACTIVATIONS}")
    if k.dtype != torch.int64 or k.rank != x.rank - 1 or not all(dims_equal(a, b) for a, b in zip(k.shape, x.shape)):
        raise OpError(f"{OP}: k {k} must be int64 with x's leading dims ({x})")
    if w1.rank != 2 or w2.rank != 2 or not dims_equal(w1.shape[1], x.shape[-1]) \
            or not dims_equal(w2.shape[1], w1.shape[0]):
        raise OpError(f"{OP}: w1 {w1} and w2 {w2} do not chain from x {x}")
    h = w1.shape[0]
    if b1.rank != 1 or not dims_equal(b1.shape[0], h) or b2.rank != 1 or not dims_equal(b2.shape[0], w2.shape[0]):
        raise OpError(f"{OP}: biases b1 {b1} / b2 {b2} do not fit w1 {w1} / w2 {w2}")
    if (wg is None) != (bg is None) or (wg is not None and (wg.shape != w1.shape or not dims_equal(bg.shape[0], h))):
        raise OpError(f"{OP}: the gated branch needs both wg and bg shaped like w1 {w1} and b1 {b1}")
    if w2r is not None and w2r.shape != w2.shape:
        raise OpError(f"{OP}: refitted w2r {w2r} must be shaped like w2 {w2}")
    if len(splits) < 2 or splits[0] != 0 or splits[-1] != h or any(a >= b for a, b in zip(splits, splits[1:])):
        raise OpError(f"{OP}: splits {splits} must rise strictly from 0 to the hidden width {h}")
    if fractions and len(fractions) != len(splits) - 1:
        raise OpError(f"{OP}: fractions {fractions} needs one entry per learner ({len(splits) - 1})")
    return TensorType(x.dtype, x.shape[:-1] + (w2.shape[0],))


def learner(x2, w1, b1, w2, wg, bg, lo: int, hi: int, activation: str) -> torch.Tensor:
    """Learner ``lo:hi``'s hidden activations for the rows of ``x2`` (before its output weights)."""
    up = torch.addmm(b1[lo:hi], x2, w1[lo:hi].t())
    if wg is None:
        return activate(up, activation)
    return activate(torch.addmm(bg[lo:hi], x2, wg[lo:hi].t()), activation) * up


def learners(splits) -> list[tuple[int, int]]:
    return list(zip(splits[:-1], splits[1:]))


@register_op(OP, inputs=["x", "k", "w1", "b1", "w2", "b2", "wg?", "bg?", "w2r?"],
             attrs={"splits": Attr("ints", doc="learner boundaries in the hidden width: 0 = s0 < ... < sN = H"),
                    "activation": Attr("str", "gelu", f"one of {', '.join(ACTIVATIONS)}"),
                    "fractions": Attr("floats", (), "calibrated fraction of rows running each learner (cost model)")},
             infer=_acm_type, tags=["gemm", "fused"])
def acm(x, k, w1, b1, w2, b2, wg=None, bg=None, w2r=None, *, splits, activation, fractions):
    """Sum of the first k learners per row, as a masked loop over the learners (the reference)."""
    n = len(splits) - 1
    x2 = x.reshape(-1, x.shape[-1])
    k2 = k.reshape(-1, 1)
    y = torch.zeros(x2.shape[0], w2.shape[0], dtype=x.dtype)
    for i, (lo, hi) in enumerate(learners(splits)):
        h = learner(x2, w1, b1, w2, wg, bg, lo, hi, activation)
        out = h @ w2[:, lo:hi].t()
        if w2r is not None:
            out = torch.where(k2 == n, out, h @ w2r[:, lo:hi].t())
        if i == 0:
            out = out + b2
        y = y + torch.where(k2 > i, out, torch.zeros_like(out))
    return y.reshape(*x.shape[:-1], w2.shape[0])


@register_cost(OP)
def _acm_cost(node):
    """Expected FLOPs at the calibrated fractions (all learners when none are stored)."""
    x, _, w1, _, w2 = (v.type for v in node.inputs[:5])
    rows = sympy.sympify(x.numel()) / sympy.sympify(x.shape[-1])
    d, m = sympy.sympify(x.shape[-1]), sympy.sympify(w2.shape[0])
    gated = len(node.inputs) > 6 and node.inputs[6] is not None
    act = 0 if node.attrs["activation"] == "none" else 1
    splits = node.attrs["splits"]
    fractions = node.attrs["fractions"] or (1.0,) * (len(splits) - 1)
    per_row = 0
    for (lo, hi), f in zip(learners(splits), fractions):
        width = hi - lo
        per_row += sympy.Rational(f).limit_denominator(10 ** 6) * width * (
            2 * d * (2 if gated else 1) + 1 + act + (2 if gated else 0) + 2 * m)
    return rows * (per_row + m)


def expected_fraction(splits, fractions) -> float:
    """The share of the dense MLP's learner FLOPs that the calibrated fractions run."""
    total = splits[-1]
    return sum(f * (hi - lo) for (lo, hi), f in zip(learners(splits), fractions)) / total


__all__ = ["GATE", "OP", "acm", "acm_gate", "expected_fraction", "gate_choice", "learner", "learners"]
