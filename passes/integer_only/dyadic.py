"""Dyadic arithmetic: every scale change of integer_only is ``m / 2^k`` (with optional pre-shifts),
chosen at compile time so that no int32 intermediate can overflow."""
from __future__ import annotations

import itertools
import math

import torch

from graphopt.passes.integer_only import IntegerConversionError

INT32_LIMIT = 2 ** 31 - 1


def choose_dyadic(branches, cmax: float, K: int, out_max: int, allow_pre: bool = True):
    """Pick pre-shifts (one per branch), a common shift k and multipliers so that int32 never overflows:
    sum_i ceil(B_i / 2^pre_i) * max|m_i| + max|c| + K * 2^k < 2^31. ``branches``: (r, bound) with r the
    float64 rescale tensor. Minimises (truncation error of the pre-shifts) + (multiplier rounding error)."""
    infos = []
    for r, bound in branches:
        ra = r.abs()
        rmax = ra.max().item()
        nz = ra[ra > 0]
        rmin = nz.min().item() if nz.numel() else 0.0
        infos.append((rmax, rmin, max(int(bound), 1)))
    best = None
    ranges = [range(0, 25 if allow_pre else 1) for _ in infos]
    for pres in itertools.product(*ranges):
        # total(k) = 2^k (K + cmax + 1 + sum_i B_i' rmax_i 2^p_i) + sum_i B_i' must stay below the limit
        bsum = sum(-(-b // 2 ** p) for (_, _, b), p in zip(infos, pres))
        per = K + cmax + 1 + sum(-(-b // 2 ** p) * rmax * 2 ** p for (rmax, _, b), p in zip(infos, pres))
        room = INT32_LIMIT - 16 - bsum
        if room <= per:
            continue
        k_best = min(40, int(math.floor(math.log2(room / per))))
        while k_best > 0 and 2 ** k_best * per + bsum >= INT32_LIMIT - 16:
            k_best -= 1
        err = 0.0
        for (rmax, rmin, _), p in zip(infos, pres):
            if p:
                err += rmax * 2 ** p
            if rmin > 0:
                err += out_max / (2 * max(rmin * 2 ** (p + k_best), 1e-9))
        if best is None or err < best[0] - 1e-12:
            best = (err, pres, k_best)
    if best is None:
        listing = ", ".join(f"rescale up to {rmax:.3g} of values up to {b}" for rmax, _, b in infos)
        raise IntegerConversionError(f"no int32-safe dyadic rescale exists for these ranges ({listing}; "
                                     f"constant term {cmax:.3g})")
    _, pres, k = best
    ms = [torch.round(r * 2.0 ** (p + k)).to(torch.int64) for (r, _), p in zip(branches, pres)]
    return list(pres), k, ms
