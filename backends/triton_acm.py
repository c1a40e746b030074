"""Triton kernel for ``acm`` (rows grouped by k), and the registration of the torch backend's kernel.

The host sorts the rows by k (descending, stable) once. One program owns ``BLOCK_M`` consecutive
sorted rows and ``BLOCK_O`` output columns: it gathers its rows of x through the sort order in its
loads, runs learners 0 .. k_max - 1 of the block (k_max = the block's first row's k, rows sorted), a
row taking part in learner i only while k > i, accumulates ``act(x w1_tileᵀ + b1) w2_tileᵀ`` tile by
tile of each learner's hidden width, and scatters its rows back to token order in its store. Blocks
of rows with small k stop after few learners: the saving is real work skipped, not masked.
Rows with k = N use ``w2``, others the refitted ``w2r`` when there is one.

triton is imported lazily (``available()``); tests run the kernel with ``TRITON_INTERPRET=1`` on CPU
tensors. On a CPU the torch backend runs the grouped kernel of ``backends/acm_cpu.py``.
"""
from __future__ import annotations

import functools

import torch

from graphopt.backends.acm_cpu import grouped_acm
from graphopt.backends.kernels import register_kernel
from graphopt.backends.triton_low_rank import available
from graphopt.ir.ops.acm import OP

_ACT_CODE = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def acm_kernel(x_ptr, order_ptr, ks_ptr, splits_ptr, w1_ptr, b1_ptr, wg_ptr, bg_ptr, w2_ptr, w2r_ptr, b2_ptr,
                   y_ptr, T, D, H, O, N,
                   ACT: tl.constexpr, GATED: tl.constexpr, REFIT: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr, PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_o = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        src = tl.load(order_ptr + rows, mask=row_ok, other=0)          # gather: sorted row -> token
        kr = tl.load(ks_ptr + rows, mask=row_ok, other=0)
        k_max = tl.load(ks_ptr + pid_m * BLOCK_M)                        # sorted: the block's first row
        o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        o_ok = o < O
        full = kr == N
        acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
        for i in range(0, k_max):
            lo = tl.load(splits_ptr + i)
            hi = tl.load(splits_ptr + i + 1)
            active = row_ok & (kr > i)
            for h0 in range(lo, hi, BLOCK_H):
                hh = h0 + tl.arange(0, BLOCK_H)
                h_ok = hh < hi
                pre = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
                gate = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
                for k0 in range(0, D, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    k_ok = kk < D
                    xt = tl.load(x_ptr + src[:, None] * D + kk[None, :], mask=active[:, None] & k_ok[None, :], other=0.0)
                    w1t = tl.load(w1_ptr + hh[None, :] * D + kk[:, None], mask=h_ok[None, :] & k_ok[:, None], other=0.0)
                    pre += tl.dot(xt.to(tl.float32), w1t.to(tl.float32), input_precision=PRECISION)
                    if GATED:
                        wgt = tl.load(wg_ptr + hh[None, :] * D + kk[:, None], mask=h_ok[None, :] & k_ok[:, None],
                                      other=0.0)
                        gate += tl.dot(xt.to(tl.float32), wgt.to(tl.float32), input_precision=PRECISION)
                pre += tl.load(b1_ptr + hh, mask=h_ok, other=0.0).to(tl.float32)[None, :]
                if GATED:
                    t = gate + tl.load(bg_ptr + hh, mask=h_ok, other=0.0).to(tl.float32)[None, :]
                else:
                    t = pre
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
                hid = t * pre if GATED else t
                hid = tl.where(active[:, None] & h_ok[None, :], hid, 0.0)
                w2t = tl.load(w2_ptr + o[None, :] * H + hh[:, None], mask=o_ok[None, :] & h_ok[:, None], other=0.0)
                if REFIT:
                    w2rt = tl.load(w2r_ptr + o[None, :] * H + hh[:, None], mask=o_ok[None, :] & h_ok[:, None],
                                   other=0.0)
                    acc += tl.dot(tl.where(full[:, None], hid, 0.0), w2t.to(tl.float32), input_precision=PRECISION)
                    acc += tl.dot(tl.where(full[:, None], 0.0, hid), w2rt.to(tl.float32), input_precision=PRECISION)
                else:
                    acc += tl.dot(hid, w2t.to(tl.float32), input_precision=PRECISION)
        b2 = tl.load(b2_ptr + o, mask=o_ok, other=0.0).to(tl.float32)
        acc += tl.where((kr > 0)[:, None], b2[None, :], 0.0)
        tl.store(y_ptr + src[:, None] * O + o[None, :], acc.to(y_ptr.dtype.element_ty),   # scatter back
                 mask=row_ok[:, None] & o_ok[None, :])

    return acm_kernel


def triton_acm(x, k, w1, b1, w2, b2, wg=None, bg=None, w2r=None, *, splits, activation, fractions=(),
               block_m: int = 16, block_h: int = 32, block_o: int = 64, precision: str = "ieee") -> torch.Tensor:
    """Run the grouped kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    import triton

    if activation not in _ACT_CODE:
        raise ValueError(f"acm kernel: unknown activation {activation!r}; use one of {sorted(_ACT_CODE)}")
    lead, d, o = x.shape[:-1], x.shape[-1], w2.shape[0]
    x2 = x.reshape(-1, d).contiguous()
    k2 = k.reshape(-1)
    t = x2.shape[0]
    y = torch.empty(t, o, device=x.device, dtype=x.dtype)
    if t == 0:
        return y.reshape(*lead, o)
    ks, order = torch.sort(k2, descending=True, stable=True)
    split_t = torch.tensor(list(splits), dtype=torch.int32, device=x.device)
    gated, refit = wg is not None, w2r is not None
    grid = (triton.cdiv(t, block_m), triton.cdiv(o, block_o))
    _kernel()[grid](x2, order.to(torch.int32).contiguous(), ks.to(torch.int32).contiguous(), split_t,
                    w1.contiguous(), b1.contiguous(), (wg if gated else w1).contiguous(),
                    (bg if gated else b1).contiguous(), w2.contiguous(), (w2r if refit else w2).contiguous(),
                    b2.contiguous(), y, t, d, w1.shape[0], o, len(splits) - 1,
                    ACT=_ACT_CODE[activation], GATED=gated, REFIT=refit, BLOCK_M=block_m, BLOCK_K=32,
                    BLOCK_H=block_h, BLOCK_O=block_o, PRECISION=precision)
    return y.reshape(*lead, o)


def _needs_triton(node) -> str | None:
    return None if available() else "triton does not import on this machine"


register_kernel("triton", OP, supports=_needs_triton)(triton_acm)


@register_kernel("torch", OP)
def acm_on_device(x, k, w1, b1, w2, b2, wg=None, bg=None, w2r=None, *, splits, activation, fractions=()):
    """The Triton kernel on CUDA tensors (when triton imports), the grouped CPU kernel elsewhere."""
    if x.is_cuda and available():
        return triton_acm(x, k, w1, b1, w2, b2, wg, bg, w2r, splits=splits, activation=activation)
    return grouped_acm(x, k, w1, b1, w2, b2, wg, bg, w2r, splits=splits, activation=activation)
