"""The grouped CPU kernel of ``acm`` (what the torch backend runs on a CPU).

Rows are sorted by k once (descending, stable), so the rows that run learner i are the contiguous
prefix ``[0, count_i)`` of the sorted block, ``count_i = #{k > i}``: learner i is one dense GEMM
pair (``addmm`` into the output rows) over that prefix, and learner i + 1 works on a shorter prefix
of the same buffers. The rows are gathered once on the way in and scattered once on the way out
(``index_select`` / ``index_copy_``); rows with k = 0 are zero. With refitted output weights (``w2r``)
the rows with k = N (the first ``count_{N-1}`` rows) use ``w2`` and the others ``w2r``: two GEMMs
over two contiguous ranges.
"""
from __future__ import annotations

import torch

from graphopt.ir.ops.acm import learner, learners


def grouped_acm(x, k, w1, b1, w2, b2, wg=None, bg=None, w2r=None, *, splits, activation, fractions=()):
    n = len(splits) - 1
    lead, d, m = x.shape[:-1], x.shape[-1], w2.shape[0]
    x2 = x.reshape(-1, d)
    k2 = k.reshape(-1)
    order = torch.argsort(k2, descending=True, stable=True)
    per_k = torch.bincount(k2, minlength=n + 1)
    counts = (k2.numel() - per_k.cumsum(0)[:n]).tolist()  # counts[i] = #{k > i}
    ys = torch.zeros(x2.shape[0], m, dtype=x.dtype)
    if counts[0]:
        xs = x2.index_select(0, order[:counts[0]])
        full = counts[n - 1]  # rows with k = N come first
        for i, (lo, hi) in enumerate(learners(splits)):
            rows = counts[i]
            if rows == 0:
                break
            h = learner(xs[:rows], w1, b1, w2, wg, bg, lo, hi, activation)
            if w2r is None or full == rows:
                _accumulate(ys[:rows], h, w2[:, lo:hi], b2 if i == 0 else None)
            else:
                if full:
                    _accumulate(ys[:full], h[:full], w2[:, lo:hi], b2 if i == 0 else None)
                _accumulate(ys[full:rows], h[full:], w2r[:, lo:hi], b2 if i == 0 else None)
    y = torch.empty_like(ys)
    y.index_copy_(0, order, ys)
    return y.reshape(*lead, m)


def _accumulate(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out += h wᵀ (+ bias), in place on a contiguous block of rows."""
    if bias is not None:
        torch.addmm(bias, h, w.t(), out=out)  # out was zero: the first learner writes it
    else:
        out.addmm_(h, w.t())
