"""Post-training calibration: per-tensor activation ranges from a calibration set.

``collect_stats(graph, batches, values)`` runs the graph (reference backend) once over the batches
and keeps, per value, the min, the max, a random sample of |x| (for percentile and MSE-optimal
clipping) and the per-channel max |x| over the last axis (for SmoothQuant-style migration).
``clip_range(stats, bits, method, percentile)`` turns that into the symmetric clipping magnitude.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graphopt.progress import task

SAMPLE = 1 << 16
MSE_SAMPLE = 1 << 15


@dataclass
class Stats:
    lo: float = float("inf")
    hi: float = float("-inf")
    samples: list = field(default_factory=list)
    channel_absmax: torch.Tensor | None = None

    @property
    def absmax(self) -> float:
        return max(abs(self.lo), abs(self.hi), 0.0)


def collect_stats(graph, batches, values, *, seed: int = 0) -> dict[str, Stats]:
    from graphopt.ir.interpreter import collect

    gen = torch.Generator().manual_seed(seed)
    stats = {v.name: Stats() for v in values}
    with task(f"calibration: {len(values)} values over {len(batches)} batches", total=len(batches)) as advance:
        for found in collect(graph, batches, values):
            advance()
            for name, t in found.items():
                s = stats[name]
                if t.dtype == torch.bool:          # masks: lo == 1.0 means all True so far
                    s.lo = min(s.lo, float(t.all().item()))
                    s.hi = 1.0
                    continue
                t = t.detach().float()
                if t.numel() == 0:
                    continue
                s.lo = min(s.lo, t.min().item())
                s.hi = max(s.hi, t.max().item())
                flat = t.reshape(-1).abs()
                if flat.numel() > SAMPLE:
                    flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=gen)]
                s.samples.append(flat)
                if t.dim() >= 1:
                    cm = t.abs().reshape(-1, t.shape[-1]).amax(0)
                    s.channel_absmax = cm if s.channel_absmax is None else torch.maximum(s.channel_absmax, cm)
    return stats


def clip_range(s: Stats, bits: int, method: str = "minmax", percentile: float = 99.99) -> float:
    """The clipping magnitude a for a symmetric signed ``bits`` quantizer (scale a / (2^(bits-1) - 1))."""
    amax = s.absmax
    if amax == 0.0 or method == "minmax" or not s.samples:
        return amax if amax > 0 else 1.0
    x = torch.cat(s.samples)
    if x.numel() > MSE_SAMPLE:
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:MSE_SAMPLE]]
    if method == "percentile":
        a = torch.quantile(x[:1 << 24], percentile / 100.0).item() if x.numel() else amax
        return max(a, amax * 1e-3)
    if method == "mse":
        levels = 2 ** (bits - 1) - 1
        fracs = torch.linspace(0.3, 1.0, 29, dtype=torch.float64)
        scales = (amax * fracs / levels)[:, None]
        xd = x.double()[None, :]
        q = torch.clamp(torch.floor(xd / scales + 0.5), max=levels) * scales
        err = ((q - xd) ** 2).mean(1)
        return amax * fracs[int(torch.argmin(err))].item()
    raise ValueError(f"unknown calibration method {method!r}; use minmax, percentile or mse")
