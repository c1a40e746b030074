"""Sparse or dense, decided by measurement: the per-layer decision and where its times come from.

On CPUs an SpMM only beats a tuned dense GEMM at high sparsity, and where depends on the shape and the
machine, so nothing here assumes it: per layer the dense and sparse times at that shape (rows x out x
in) and sparsity come from (in this order) injected timings (measured elsewhere, e.g. by tests or an
earlier report), the JSON cache of earlier measurements on this machine, or a micro-benchmark (a
target's ``SPMM_TIMERS`` entry, or the caller's own timer), whose results go to the cache. A layer is
sparse only when the sparse time beats the dense one by a margin; every decision carries both times and
the reason. Shared by ``sparsify``'s substitution and the ``cpu_integer`` backend's int8 SpMM rule.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from graphopt.ir.ops.sparse import SPMM_TIMERS


@dataclass
class Decision:
    layer: str
    shape: tuple[int, int]      # out, in
    rows: int
    sparsity: float
    format: str
    dense_ms: float | None
    sparse_ms: float | None
    sparse: bool
    why: str

    def line(self) -> str:
        times = (f"dense {self.dense_ms:.3g} ms, {self.format} {self.sparse_ms:.3g} ms"
                 if self.dense_ms is not None and self.sparse_ms is not None else "no timing")
        m, n = self.shape
        return (f"{self.layer} [{self.rows}x{n} -> {m}] {self.sparsity:.0%} sparse: "
                f"{'SPARSE' if self.sparse else 'dense'} ({times}; {self.why})")


def decide(layer: str, shape: tuple[int, int], rows: int, sparsity: float, fmt: str, dense_ms: float | None,
           sparse_ms: float | None, margin: float) -> Decision:
    """Sparse only when measured faster than dense by ``margin`` (a fraction of the dense time)."""
    if dense_ms is None or sparse_ms is None:
        return Decision(layer, shape, rows, sparsity, fmt, dense_ms, sparse_ms, False,
                        "no measurement for this target (no SpMM timer registered and no timings given)")
    if sparse_ms < dense_ms * (1.0 - margin):
        return Decision(layer, shape, rows, sparsity, fmt, dense_ms, sparse_ms, True,
                        f"sparse is {dense_ms / sparse_ms:.2f}x faster")
    why = (f"sparse would be {sparse_ms / dense_ms:.2f}x the dense time: below break-even at this shape"
           if sparse_ms >= dense_ms else
           f"only {dense_ms / sparse_ms:.2f}x faster, under the {margin:.0%} margin")
    return Decision(layer, shape, rows, sparsity, fmt, dense_ms, sparse_ms, False, why)


class TimingSource:
    """Measured (dense, sparse) ms per layer: injected, cached on disk, or measured now."""

    def __init__(self, target: str, threads: int, injected: dict | None, cache: str, measure: bool, timer=None):
        """``timer``: (weight, fmt, rows, threads) -> (dense ms, sparse ms); default the target's ``SPMM_TIMERS``
        entry (a backend that decides inside its own rules, like cpu_integer's int8 SpMM, passes its own)."""
        self.target, self.threads = target, threads
        self.injected = {str(k): v for k, v in (injected or {}).items()}
        self.timer = (timer or SPMM_TIMERS.find(target)) if measure else None
        self.path = Path(cache) if cache else None
        self.cached: dict = {}
        if self.path is not None and self.path.exists():
            try:
                self.cached = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.cached = {}
        self.measured = 0

    def times(self, layer: str, weight: torch.Tensor, fmt: str, rows: int) -> tuple[float | None, float | None, str]:
        """(dense ms, sparse ms, where they came from)."""
        if layer in self.injected:
            given = self.injected[layer]
            d, s = given.split("/") if isinstance(given, str) else given
            return float(d), float(s), "given"
        if self.timer is None:
            return None, None, "none"
        n, k = weight.shape
        nnz = int((weight != 0).sum())
        key = (f"{self.target}|{getattr(self.timer, 'machine', '?')}|t{self.threads}|{rows}x{k}->{n}|{fmt}|"
               f"nnz{round(100 * nnz / max(1, n * k))}%")
        if key in self.cached:
            d, s = self.cached[key]
            return float(d), float(s), "cached"
        d, s = self.timer(weight, fmt, rows, self.threads)
        self.cached[key] = [d, s]
        self.measured += 1
        return d, s, "measured"

    def save(self) -> None:
        if self.path is not None and self.measured:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.cached, indent=1, sort_keys=True))
            os.replace(tmp, self.path)


def default_cache() -> str:
    return str(Path(os.environ.get("GRAPHOPT_CACHE", Path.home() / ".cache" / "graphopt")) / "sparse_timings.json")
