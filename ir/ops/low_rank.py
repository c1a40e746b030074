"""The fused low-rank MLP op (FlashSVD-style): ``low_rank_mlp``.

    y = act(x V1ᵀ U1ᵀ + b1) V2ᵀ U2ᵀ + b2        V1 [r1, n], U1 [h, r1], V2 [r2, h], U2 [m, r2]

computed without materialising the ``[rows, h]`` intermediate: ``P = x V1ᵀ`` (rank-wide), then for
each tile of ``h`` columns ``T = act(P U1_tileᵀ + b1_tile)`` and ``Q += T V2_tileᵀ`` (rank-wide),
and finally ``y = Q U2ᵀ + b2``. Peak extra memory is ``rows * (r1 + tile + r2)`` instead of
``rows * h``. With ``activation="none"`` it is two consecutive factor pairs fused the same way.

The reference implementation is the tiled torch loop below (the torch backend's CPU path); the
torch backend runs the Triton kernel ``graphopt.backends.triton_low_rank`` on CUDA tensors, and the
ONNX lowering (``backends/onnx/low_rank.py``) writes the unfused MatMuls.
"""
from __future__ import annotations

import sympy
import torch
import torch.nn.functional as F

from graphopt.ir.cost import register_cost
from graphopt.ir.opdef import Attr, OpError, register_op
from graphopt.ir.ops.rules import result_dtype
from graphopt.ir.types import TensorType, dims_equal

OP = "low_rank_mlp"
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")


def activate(t: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return t
    if activation == "relu":
        return torch.relu(t)
    if activation == "gelu":
        return F.gelu(t)
    if activation == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    if activation == "silu":
        return F.silu(t)
    raise OpError(f"{OP}: unknown activation {activation!r}; use one of {ACTIVATIONS}")


def _type(x, v1, u1, b1, v2, u2, b2, *, activation, tile):
    if activation not in ACTIVATIONS:
        raise OpError(f"{OP}: activation {activation!r} is not one of {ACTIVATIONS}")
    if tile < 1:
        raise OpError(f"{OP}: tile must be positive, got {tile}")
    for name, t in (("v1", v1), ("u1", u1), ("v2", v2), ("u2", u2)):
        if t.rank != 2:
            raise OpError(f"{OP}: factor {name} must be 2-D, got {t}")
    chain = [(x.shape[-1], v1.shape[1], "x", "v1"), (v1.shape[0], u1.shape[1], "v1", "u1"),
             (u1.shape[0], v2.shape[1], "u1", "v2"), (v2.shape[0], u2.shape[1], "v2", "u2")]
    for a, b, na, nb in chain:
        if not dims_equal(a, b):
            raise OpError(f"{OP}: {na} and {nb} do not chain ({a} vs {b}): x {x}, v1 {v1}, u1 {u1}, v2 {v2}, u2 {u2}")
    if b1.rank != 1 or not dims_equal(b1.shape[0], u1.shape[0]):
        raise OpError(f"{OP}: bias b1 {b1} does not fit u1 {u1}")
    if b2.rank != 1 or not dims_equal(b2.shape[0], u2.shape[0]):
        raise OpError(f"{OP}: bias b2 {b2} does not fit u2 {u2}")
    return TensorType(result_dtype(x, v1), x.shape[:-1] + (u2.shape[0],))


def tiled_mlp(x, v1, u1, b1, v2, u2, b2, activation: str = "gelu", tile: int = 256) -> torch.Tensor:
    """The CPU path: never holds more than ``rows x tile`` of the hidden layer."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    p = x2 @ v1.t()                                   # [rows, r1]
    q = None                                          # [rows, r2]
    h = u1.shape[0]
    for start in range(0, h, tile):
        stop = min(h, start + tile)
        t = torch.addmm(b1[start:stop], p, u1[start:stop].t())
        t = activate(t, activation)
        part = t @ v2[:, start:stop].t()
        q = part if q is None else q.add_(part)
        del t
    y = torch.addmm(b2, q, u2.t())
    return y.reshape(*lead, u2.shape[0])


def unfused_mlp(x, v1, u1, b1, v2, u2, b2, activation: str = "gelu") -> torch.Tensor:
    """The plain chain of four matmuls (materialises the full-width intermediate)."""
    hid = activate(F.linear(F.linear(x, v1), u1, b1), activation)
    return F.linear(F.linear(hid, v2), u2, b2)


@register_op(OP, inputs=["x", "v1", "u1", "b1", "v2", "u2", "b2"],
             attrs={"activation": Attr("str", "gelu", f"one of {', '.join(ACTIVATIONS)}"),
                    "tile": Attr("int", 256, "hidden columns computed at a time")},
             infer=_type, tags=["gemm", "fused"])
def low_rank_mlp(x, v1, u1, b1, v2, u2, b2, *, activation, tile):
    """act(x V1ᵀ U1ᵀ + b1) V2ᵀ U2ᵀ + b2 without materialising the hidden layer."""
    return tiled_mlp(x, v1, u1, b1, v2, u2, b2, activation, tile)


@register_cost(OP)
def _cost(node):
    x, v1, u1, _, v2, u2, _ = (v.type for v in node.inputs)
    rows = sympy.sympify(x.numel()) / sympy.sympify(x.shape[-1])
    n, r1, h = (sympy.sympify(d) for d in (v1.shape[1], v1.shape[0], u1.shape[0]))
    r2, m = sympy.sympify(v2.shape[0]), sympy.sympify(u2.shape[0])
    act = 0 if node.attrs["activation"] == "none" else h
    return rows * (2 * (n * r1 + r1 * h + h * r2 + r2 * m) + h + m + act)


def peak_hidden_elements(rows: int, h: int, r1: int, r2: int, tile: int, fused: bool) -> int:
    """Elements of intermediate activations alive at the peak (for reports): the fused op holds
    ``P``, ``Q`` and one tile; the unfused chain holds the pre-activation and activation of ``h``."""
    if fused:
        return rows * (r1 + r2 + 2 * min(tile, h))
    return rows * (r1 + 2 * h + r2)


__all__ = ["ACTIVATIONS", "OP", "activate", "low_rank_mlp", "peak_hidden_elements", "tiled_mlp", "unfused_mlp"]
