"""The linear algebra of ``low_rank``: plain and activation-aware (SVD-LLM) truncated SVD.

A layer ``y = x Wᵀ`` with ``W`` [m, n] at rank r becomes ``y = (x Aᵀ) Bᵀ`` with ``A`` [r, n] and
``B`` [m, r]; it costs r(m + n) parameters instead of mn, so it only pays while r < mn / (m + n).

* plain SVD: ``W = U Σ Vᵀ``, ``A = √Σ_r V_rᵀ``, ``B = U_r √Σ_r``; ‖W - BA‖_F² is the sum of the
  dropped σ².
* SVD-LLM whitening: with the calibration Gram ``G = Xᵀ X = S Sᵀ`` (Cholesky), the output error
  ‖X (W - W')ᵀ‖_F = ‖(W - W') S‖_F, so truncating the SVD of ``W S`` is optimal for the data and
  ``A = √Σ_r V_rᵀ S⁻¹``; the output error is again the dropped singular values. When the Cholesky
  fails (a rank-deficient Gram: fewer calibration tokens than features, dead channels) a growing
  multiple of the identity is added; if that fails too a symmetric square root from ``eigh`` is
  used, and as a last resort plain SVD - each fallback is reported.
* correction (sequential calibration): when the layer's input has already changed to ``X'`` (layers
  before it were compressed), the best full-rank weight for the dense target ``X Wᵀ`` is
  ``W* = W Cᵀ G'⁻¹`` with ``C = X'ᵀ X``; whitening with ``G'`` then truncates ``W*``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def break_even(m: int, n: int) -> float:
    """The rank at which two factors cost as much as the dense [m, n] matrix."""
    return m * n / (m + n)


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """r = floor(ratio * mn / (m + n)), at least 1."""
    return max(1, int(math.floor(ratio * break_even(m, n) + 1e-9)))


def kept_params(m: int, n: int, rank: int | None) -> int:
    return m * n if rank is None else rank * (m + n)


@dataclass
class Decomposition:
    """A layer's SVD (whitened or plain), truncatable at any rank without recomputing."""
    weight: torch.Tensor            # [m, n] in float64 (the corrected W* when correction was used)
    u: torch.Tensor                 # [m, k]
    s: torch.Tensor                 # [k]
    vh_unwhitened: torch.Tensor     # [k, n]: Vᵀ S⁻¹ (plain SVD: Vᵀ)
    method: str                     # "svd" or "svd_llm"
    fallback: str = ""              # what was done when the Cholesky failed
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, n], B [m, r]) with ``B @ A`` the rank-r approximation."""
        rank = min(rank, self.s.numel())
        root = self.s[:rank].clamp_min(0).sqrt()
        a = root[:, None] * self.vh_unwhitened[:rank]
        b = self.u[:, :rank] * root[None, :]
        return a.to(dtype).contiguous(), b.to(dtype).contiguous()

    def approximation(self, rank: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        a, b = self.factors(rank, torch.float64)
        return (b @ a).to(dtype)

    def dropped_energy(self, rank: int) -> float:
        """Sum of the squared dropped singular values (the squared error, in whitened norm)."""
        return float((self.s[rank:] ** 2).sum())

    def rank_for_energy(self, energy: float) -> int:
        """The smallest rank keeping ``energy`` of the (whitened) spectral energy."""
        power = self.s ** 2
        total = float(power.sum())
        if total == 0.0:
            return 1
        cumulative = torch.cumsum(power, 0) / total
        return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype)).item()) + 1


def plain_svd(weight: torch.Tensor) -> Decomposition:
    w = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return Decomposition(w, u, s, vh, "svd")


def corrected_weight(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """W* = W Cᵀ (G' + λI)⁻¹ in float64: the least-squares weight reproducing the dense target ``X Wᵀ``
    on the compressed input ``X'`` (``gram`` = X'ᵀ X', ``cross`` = X'ᵀ X, λ = ridge x mean diag)."""
    w = weight.detach().to(torch.float64)
    g = gram.detach().to(torch.float64)
    g = 0.5 * (g + g.t())
    scale = float(torch.diagonal(g).mean()) if g.shape[0] else 1.0
    eye = torch.eye(g.shape[0], dtype=torch.float64)
    return torch.linalg.solve(g + ridge * scale * eye, cross.detach().to(torch.float64) @ w.t()).t()


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor | None = None,
                 ridge: float = 1e-4) -> Decomposition:
    """SVD-LLM: ``gram`` = Xᵀ X of the layer input [n, n] (any positive scaling). ``cross`` = X'ᵀ X
    (compressed input against dense input, same scaling) switches on the correction."""
    w = weight.detach().to(torch.float64)
    g = gram.detach().to(torch.float64)
    g = 0.5 * (g + g.t())
    n = g.shape[0]
    scale = float(torch.diagonal(g).mean()) if n else 1.0
    if not math.isfinite(scale) or scale <= 0:
        d = plain_svd(weight)
        d.fallback = "plain SVD (the calibration Gram is zero or not finite)"
        return d
    notes = []
    if cross is not None:
        w = corrected_weight(w, g, cross, ridge)
        notes.append(f"corrected for the compressed input (ridge {ridge:g})")
    fallback = ""
    eye = torch.eye(n, dtype=torch.float64)
    chol = None
    for k, eps in enumerate((0.0, 1e-8, 1e-6, 1e-4, 1e-2)):
        chol, info = torch.linalg.cholesky_ex(g + eps * scale * eye)
        if int(info) == 0 and torch.isfinite(chol).all():
            if k:
                fallback = f"Cholesky needed {eps:g} x mean(diag) added to the Gram"
            break
        chol = None
    if chol is not None:
        u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
        # Vᵀ S⁻¹: solve Z S = Vᵀ  <=>  Sᵀ Zᵀ = V
        vh_unw = torch.linalg.solve_triangular(chol.t(), vh.t(), upper=True).t()
        return Decomposition(w, u, s, vh_unw, "svd_llm", fallback, notes)
    try:  # symmetric square root: S = Q Λ^½ (not triangular, same error identity)
        lam, q = torch.linalg.eigh(g)
        floor = max(float(lam.max()), 1e-300) * 1e-10
        lam = lam.clamp_min(floor)
        sqrt_g = q * lam.sqrt()[None, :]
        inv = (q / lam.sqrt()[None, :]).t()
        u, s, vh = torch.linalg.svd(w @ sqrt_g, full_matrices=False)
        return Decomposition(w, u, s, vh @ inv, "svd_llm", "Cholesky failed; used the eigen square root", notes)
    except RuntimeError as e:  # pragma: no cover - eigh failing on a finite symmetric matrix is rare
        d = plain_svd(w)
        d.fallback = f"Cholesky and eigh failed ({e}); plain SVD"
        return d
