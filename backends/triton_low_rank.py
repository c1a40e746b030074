"""Triton kernel for the fused low-rank MLP (``low_rank_mlp``), FlashSVD-style.

One program owns ``BLOCK_M`` rows. It computes ``P = x V1ᵀ`` ([BLOCK_M, R1], in registers), then
walks the hidden width in tiles of ``BLOCK_H``: ``T = act(P U1_tileᵀ + b1_tile)`` and
``Q += T V2_tileᵀ`` ([BLOCK_M, R2]); finally ``y = Q U2ᵀ + b2`` tile by tile of the output. The
[rows, h] hidden layer never exists in memory: HBM traffic is x, the factors and y.

triton is imported lazily (``available()``), so graphopt works without it. Tests run the kernel
with ``TRITON_INTERPRET=1`` on CPU tensors (set before triton is imported).
"""
from __future__ import annotations

import functools
import os

import torch

from graphopt.backends.kernels import register_kernel
from graphopt.ir.ops.low_rank import OP as LOW_RANK_MLP, low_rank_mlp as reference

_ACT_CODE = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


@functools.lru_cache(maxsize=None)
def available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def low_rank_mlp_kernel(x_ptr, v1_ptr, u1_ptr, b1_ptr, v2_ptr, u2_ptr, b2_ptr, y_ptr,
                            M, N, H, R1, R2, O,
                            ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_R1: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R2: tl.constexpr,
                            BLOCK_O: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        r1 = tl.arange(0, BLOCK_R1)
        r2 = tl.arange(0, BLOCK_R2)
        # P = x V1ᵀ  (V1 is [R1, N] row-major)
        p = tl.zeros((BLOCK_M, BLOCK_R1), dtype=tl.float32)
        for k0 in range(0, N, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + rows[:, None] * N + k[None, :], mask=row_ok[:, None] & (k[None, :] < N), other=0.0)
            v1k = tl.load(v1_ptr + r1[None, :] * N + k[:, None], mask=(r1[None, :] < R1) & (k[:, None] < N), other=0.0)
            p += tl.dot(xk.to(tl.float32), v1k.to(tl.float32), input_precision=PRECISION)
        # Q = sum over hidden tiles of act(P U1_tileᵀ + b1) V2_tileᵀ  (U1 [H, R1], V2 [R2, H])
        q = tl.zeros((BLOCK_M, BLOCK_R2), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            h_ok = h < H
            u1t = tl.load(u1_ptr + h[None, :] * R1 + r1[:, None], mask=h_ok[None, :] & (r1[:, None] < R1), other=0.0)
            b1 = tl.load(b1_ptr + h, mask=h_ok, other=0.0)
            t = tl.dot(p, u1t.to(tl.float32), input_precision=PRECISION) + b1[None, :].to(tl.float32)
            if ACT == 1:
                t = tl.maximum(t, 0.0)
            elif ACT == 2:
                t = 0.5 * t * (1.0 + tl.erf(t * 0.7071067811865476))
            elif ACT == 3:
                inner = 0.7978845608028654 * (t + 0.044715 * t * t * t)
                e = tl.exp(-2.0 * tl.abs(inner))
                th = (1.0 - e) / (1.0 + e)
                th = tl.where(inner >= 0, th, -th)
                t = 0.5 * t * (1.0 + th)
            elif ACT == 4:
                e = tl.exp(-tl.abs(t))
                t = t * tl.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            t = tl.where(h_ok[None, :], t, 0.0)
            v2t = tl.load(v2_ptr + r2[None, :] * H + h[:, None], mask=(r2[None, :] < R2) & h_ok[:, None], other=0.0)
            q += tl.dot(t, v2t.to(tl.float32), input_precision=PRECISION)
        # y = Q U2ᵀ + b2  (U2 [O, R2])
        for o0 in range(0, O, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O)
            o_ok = o < O
            u2t = tl.load(u2_ptr + o[None, :] * R2 + r2[:, None], mask=o_ok[None, :] & (r2[:, None] < R2), other=0.0)
            b2 = tl.load(b2_ptr + o, mask=o_ok, other=0.0)
            y = tl.dot(q, u2t.to(tl.float32), input_precision=PRECISION) + b2[None, :].to(tl.float32)
            tl.store(y_ptr + rows[:, None] * O + o[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & o_ok[None, :])

    return low_rank_mlp_kernel


def _pow2(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def low_rank_mlp(x, v1, u1, b1, v2, u2, b2, *, activation: str = "gelu", block_m: int = 32, block_h: int = 64,
                 precision: str = "ieee") -> torch.Tensor:
    """Run the fused kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    import triton

    if activation not in _ACT_CODE:
        raise ValueError(f"low_rank_mlp kernel: unknown activation {activation!r}; use one of {sorted(_ACT_CODE)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m_rows, n = x2.shape
    r1, h, r2, o = v1.shape[0], u1.shape[0], v2.shape[0], u2.shape[0]
    y = torch.empty(m_rows, o, device=x.device, dtype=x.dtype)
    if m_rows == 0:
        return y.reshape(*lead, o)
    grid = (triton.cdiv(m_rows, block_m),)
    _kernel()[grid](x2, v1.contiguous(), u1.contiguous(), b1.contiguous(), v2.contiguous(), u2.contiguous(),
                    b2.contiguous(), y, m_rows, n, h, r1, r2, o,
                    ACT=_ACT_CODE[activation], BLOCK_M=block_m, BLOCK_K=32, BLOCK_R1=_pow2(r1),
                    BLOCK_H=block_h, BLOCK_R2=_pow2(r2), BLOCK_O=64, PRECISION=precision)
    return y.reshape(*lead, o)


def _needs_triton(node) -> str | None:
    return None if available() else "triton does not import on this machine"


@register_kernel("triton", LOW_RANK_MLP, supports=_needs_triton)
def low_rank_mlp_triton(x, v1, u1, b1, v2, u2, b2, *, activation, tile):
    """The op on the triton target. Its ``tile`` bounds the memory of the CPU loop; the kernel holds one BLOCK_H
    slice of the hidden layer per row block anyway."""
    return low_rank_mlp(x, v1, u1, b1, v2, u2, b2, activation=activation)


@register_kernel("torch", LOW_RANK_MLP)
def low_rank_mlp_on_device(x, v1, u1, b1, v2, u2, b2, *, activation, tile):
    """The Triton kernel on CUDA tensors (when triton imports), the tiled reference elsewhere."""
    if x.is_cuda and available():
        return low_rank_mlp(x, v1, u1, b1, v2, u2, b2, activation=activation)
    return reference(x, v1, u1, b1, v2, u2, b2, activation=activation, tile=tile)
