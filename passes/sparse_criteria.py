"""Which weights ``sparsify`` removes: criteria (magnitude, Wanda, SparseGPT) and patterns.

Every criterion works on one matrix W [out, in] (``in`` the reduction axis K) and, where it uses
calibration, on the layer input's Gram ``G = XᵀX / tokens`` [in, in]:

  * ``magnitude``  score |W_ij|
  * ``wanda``      score |W_ij| · ‖X_j‖₂ (Sun et al. 2023; ‖X_j‖ ∝ sqrt(G_jj))
  * ``sparsegpt``  OBS pruning with weight updates (Frantar & Alistarh 2023): columns left to right in
                   blocks of 128, a weight's removal error ``w² / [H⁻¹]_jj²`` (H = G + damping, the
                   Cholesky factor of H⁻¹) chooses the mask, and the error is spread over the columns
                   not yet visited; so the kept weights change, not only the mask

Patterns (each row of W is pruned on its own, so every output keeps the same share of weights):
``unstructured`` (the lowest-scoring ``sparsity`` fraction of each row), ``N:M`` (at most N nonzeros
in every M consecutive input weights, e.g. 2:4), ``block1x4`` (whole blocks of 4 consecutive input
weights, scored by their summed score: the shape one VNNI instruction reads).
"""
from __future__ import annotations

import re

import torch

CRITERIA = ("magnitude", "wanda", "sparsegpt")
SPARSEGPT_BLOCK = 128


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4): at most N nonzeros in every M; None for other patterns."""
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m:
        return None
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"pattern {pattern!r}: N:M needs 0 < N < M (N nonzeros kept in every M weights)")
    return n, mm


def scores(w: torch.Tensor, criterion: str, gram: torch.Tensor | None) -> torch.Tensor:
    """Importance of each weight (higher is kept) for magnitude and Wanda."""
    if criterion == "magnitude":
        return w.abs().double()
    if criterion == "wanda":
        if gram is None:
            raise ValueError("criterion wanda needs calibration activations (the input channel norms)")
        return w.abs().double() * gram.diagonal().clamp_min(0).sqrt()[None, :].to(torch.float64)
    raise ValueError(f"unknown criterion {criterion!r}; use one of {CRITERIA}")


def mask_from_scores(s: torch.Tensor, pattern: str, sparsity: float) -> torch.Tensor:
    """Bool mask [out, in] of the weights to REMOVE, per row."""
    rows, k = s.shape
    nm = parse_nm(pattern)
    if nm is not None:
        n, m = nm
        pad = (-k) % m
        sp = torch.nn.functional.pad(s, (0, pad), value=float("inf")).reshape(rows, -1, m)
        drop = torch.zeros_like(sp, dtype=torch.bool)
        drop.scatter_(2, sp.topk(m - n, dim=2, largest=False).indices, True)
        return drop.reshape(rows, -1)[:, :k]
    if pattern == "block1x4":
        pad = (-k) % 4
        blocks = torch.nn.functional.pad(s, (0, pad)).reshape(rows, -1, 4).sum(-1)
        drop = _lowest(blocks, round(sparsity * blocks.shape[1]))
        return drop.repeat_interleave(4, dim=1)[:, :k]
    if pattern == "unstructured":
        return _lowest(s, round(sparsity * k))
    raise ValueError(f"unknown pattern {pattern!r}; use unstructured, N:M (2:4, 4:8), block1x4")


def _lowest(s: torch.Tensor, count: int) -> torch.Tensor:
    drop = torch.zeros_like(s, dtype=torch.bool)
    if count > 0:
        drop.scatter_(1, s.topk(count, dim=1, largest=False).indices, True)
    return drop


def prune(w: torch.Tensor, criterion: str, pattern: str, sparsity: float, gram: torch.Tensor | None = None,
          damp: float = 0.01, update: bool = False) -> torch.Tensor:
    """The pruned W (same shape and dtype) for any criterion and pattern; ``update``: a magnitude / Wanda
    mask's kept weights refitted by SparseGPT's compensation (needs the Gram)."""
    if criterion == "sparsegpt" or update:
        if gram is None:
            raise ValueError(f"criterion {criterion}{' with update' if update else ''} needs calibration activations "
                             "(the layer input's Hessian)")
        mask = None if criterion == "sparsegpt" else mask_from_scores(scores(w, criterion, gram), pattern, sparsity)
        return sparsegpt(w, gram, pattern, sparsity, damp, mask=mask)
    drop = mask_from_scores(scores(w, criterion, gram), pattern, sparsity)
    return w.masked_fill(drop, 0)


def sparsegpt(w: torch.Tensor, gram: torch.Tensor, pattern: str, sparsity: float, damp: float = 0.01,
              block: int = SPARSEGPT_BLOCK, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SparseGPT: mask chosen per block of columns (per row) by w² / [chol(H⁻¹)]_jj², each removed
    weight's error compensated on the not-yet-visited columns of its row. With ``mask`` (bool [out, in],
    True = remove, e.g. Wanda's) only the compensation runs: the kept weights are refitted to that mask."""
    W = w.detach().to(torch.float64).clone()
    rows, k = W.shape
    H = gram.to(torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * H.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    nm = parse_nm(pattern)
    if nm is not None and block % nm[1]:
        block = nm[1] * max(1, block // nm[1])
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        H1 = Hinv[i1:i2, i1:i2]
        d = H1.diagonal()
        err1 = torch.zeros_like(W1)
        if mask is not None:
            drop = mask[:, i1:i2]
        elif nm is None:
            drop = mask_from_scores(W1 ** 2 / d[None, :] ** 2, pattern, sparsity)
        else:
            drop = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if mask is None and nm is not None and i % nm[1] == 0:
                part = W1[:, i:i + nm[1]] ** 2 / d[None, i:i + nm[1]] ** 2
                drop[:, i:i + nm[1]] = mask_from_scores(part, pattern, sparsity)
            col = W1[:, i]
            q = col.masked_fill(drop[:, i], 0.0)
            e = (col - q) / H1[i, i]
            W1[:, i:] -= e[:, None] * H1[i, i:][None, :]
            W1[:, i] = q
            err1[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]
    return W.to(w.dtype)


def refit_rows(w: torch.Tensor, drop: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, damp: float = 0.01,
               bias: torch.Tensor | None = None, chunk: int = 64, shift: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The exact masked least squares of each output row: its kept weights (and its bias) chosen to give the
    DENSE layer's output from the inputs the layer really receives. Row i with kept columns S (``drop`` False):

        min ‖X' θ_S - X_d θ_dense‖² / tokens + λ ‖θ_S - θ_dense,S‖²,   θ = [w_i; b_i]

    solved as (G'_SS + λI) θ_S = (C θ_dense)_S + λ θ_dense,S with G' = E[x'x'ᵀ] (``gram``) and C = E[x'x_dᵀ]
    (``cross``), x' the (pruned model's) layer input and x_d the dense model's, both with a trailing 1 when
    ``bias`` is given ([in+1, in+1]). λ = ``damp`` x the mean input diagonal of G' pulls the fit toward the
    dense weights, not toward zero: with few calibration tokens per kept column (MiniLM fc2: 768 kept of 1536
    from ~2000 tokens) the plain fit memorises the calibration set; λ -> ∞ gives the mask alone (Wanda).
    Unlike SparseGPT's one pass over the columns this solves each row's system exactly, and with x' != x_d it
    also compensates the error of the layers pruned before. ``shift`` = E[x' δᵀ] ([in(+1), out]) moves the
    target to the dense output + δ (per token): with δ = r_dense - r' the residual stream's error, the layer
    also makes up the error its residual add receives. Returns (W', b') in float64."""
    rows, k = w.shape
    theta = w.to(torch.float64)
    if bias is not None:
        theta = torch.cat([theta, bias.to(torch.float64)[:, None]], 1)
        drop = torch.cat([drop, torch.zeros(rows, 1, dtype=torch.bool, device=drop.device)], 1)
    g, c = gram.to(torch.float64), cross.to(torch.float64)
    if g.shape != (theta.shape[1],) * 2 or c.shape != g.shape:
        raise ValueError(f"refit: Gram {tuple(g.shape)} / cross {tuple(c.shape)} do not match the weights "
                         f"{tuple(theta.shape)} (with a bias, both carry the input's trailing 1)")
    lam = damp * float(g.diagonal()[:k].mean().clamp_min(1e-12))
    rhs = theta @ c.t()                                   # row i: C θ_i
    if shift is not None:
        if shift.shape != (theta.shape[1], rows):
            raise ValueError(f"refit: shift {tuple(shift.shape)} does not match the input x outputs "
                             f"{(theta.shape[1], rows)}")
        rhs = rhs + shift.to(torch.float64).t()
    keep_counts = (~drop).sum(1)
    out = torch.zeros_like(theta)
    for n_keep in keep_counts.unique().tolist():          # rows with the same kept count solve as one batch
        same = (keep_counts == n_keep).nonzero().flatten()
        for s in range(0, len(same), chunk):
            r = same[s:s + chunk]
            idx = torch.sort((~drop[r]).to(torch.int8), dim=1, descending=True, stable=True).indices[:, :n_keep]
            a = g[idx[:, :, None], idx[:, None, :]]
            a.diagonal(dim1=1, dim2=2).add_(lam)
            b = rhs[r].gather(1, idx) + lam * theta[r].gather(1, idx)
            out[r[:, None], idx] = torch.cholesky_solve(b[:, :, None], torch.linalg.cholesky(a))[:, :, 0]
    return (out[:, :k], out[:, k]) if bias is not None else (out, None)
