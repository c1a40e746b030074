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
