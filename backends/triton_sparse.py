"""Triton kernel for ``sparse_linear`` (CSR or 1x4 blocks): y = x Wᵀ + b with W stored sparse.

One program owns ``BLOCK_M`` rows of x and one output column n: it walks the stored entries of W's
row n ``BLOCK_J`` at a time (a 1x4 block is 4 entries: k = 4 col + lane), gathers those columns of x
and accumulates in float32. Sputnik-style (no tensor cores); it is the GPU path of the ``torch``
backend and a ``triton`` kernel, tested on CPU tensors with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import functools

import torch

from graphopt.backends.kernels import register_kernel
from graphopt.backends.triton_low_rank import available
from graphopt.ir.ops.sparse import OP


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def sparse_linear_kernel(x_ptr, row_ptr, col_ptr, val_ptr, b_ptr, y_ptr, M, K, N,
                             HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_J: tl.constexpr):
        pid_m = tl.program_id(0)
        n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        start = tl.load(row_ptr + n) * WIDTH
        stop = tl.load(row_ptr + n + 1) * WIDTH
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for j0 in range(start, stop, BLOCK_J):
            e = j0 + tl.arange(0, BLOCK_J)
            e_ok = e < stop
            k = tl.load(col_ptr + e // WIDTH, mask=e_ok, other=0) * WIDTH + e % WIDTH
            ok = e_ok & (k < K)
            v = tl.load(val_ptr + e, mask=ok, other=0.0).to(tl.float32)
            xs = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None] & ok[None, :], other=0.0)
            acc += tl.sum(xs.to(tl.float32) * v[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n).to(tl.float32)
        tl.store(y_ptr + rows * N + n, acc.to(y_ptr.dtype.element_ty), mask=row_ok)

    return sparse_linear_kernel


def sparse_linear(x, row_ptr, col, values, bias=None, *, format, out_features, in_features,
                  block_m: int = 32, block_j: int = 32) -> torch.Tensor:
    """Run the kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    import triton

    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, out_features, device=x.device, dtype=x.dtype)
    if m == 0 or out_features == 0:
        return y.reshape(*lead, out_features)
    grid = (triton.cdiv(m, block_m), out_features)
    _kernel()[grid](x2, row_ptr.contiguous(), col.contiguous(), values.reshape(-1).contiguous(),
                    bias if bias is not None else x2, y, m, in_features, out_features,
                    HAS_BIAS=bias is not None, WIDTH=1 if format == "csr" else 4, BLOCK_M=block_m, BLOCK_J=block_j)
    return y.reshape(*lead, out_features)


def _needs_triton(node) -> str | None:
    return None if available() else "triton does not import on this machine"


register_kernel("triton", OP, supports=_needs_triton)(sparse_linear)
