"""The one timing policy of graphopt: candidates timed round-robin in one process, after a warm-up.

Every benchmark script and ``opt-cli --check`` time with :func:`interleaved`, so their figures mean
the same thing. Candidates alternate within every round (forward order, then reverse), so drift in
the load of a shared machine hits all of them alike; each visit makes one untimed call before the
timed one, so the previous candidate's still-spinning worker threads (ONNX Runtime, OpenMP) or
its cache footprint do not land on the timed call. Standard library only: ``opt-cli --check``
loads this file into its ONNX Runtime child process, which imports nothing of graphopt.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Hashable


@dataclass(frozen=True)
class Timing:
    """Seconds per timed call, in round order (round ``i`` of two candidates ran close together)."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def p10(self) -> float:
        return self._deciles()[0]

    @property
    def p90(self) -> float:
        return self._deciles()[-1]

    def _deciles(self) -> list[float]:
        if len(self.times) < 2:
            return [self.times[0]] * 9
        return statistics.quantiles(self.times, n=10, method="inclusive")  # as numpy.quantile's default


def interleaved(candidates: dict[Hashable, Callable[[], object]], runs: int, warmup: int = 3) -> dict[Hashable, Timing]:
    """Time every candidate (a call without arguments) ``runs`` times: ``warmup`` untimed rounds first,
    then ``runs`` rounds that visit every candidate in turn (reverse order on odd rounds), each visit
    one untimed call and one timed call."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be at least 1 and warmup at least 0, not runs={runs}, warmup={warmup}")
    order = list(candidates.items())
    for _ in range(warmup):
        for _, call in order:
            call()
    times: dict[Hashable, list[float]] = {key: [] for key, _ in order}
    for round_ in range(runs):
        for key, call in order if round_ % 2 == 0 else order[::-1]:
            call()  # settles what the previous candidate left running
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    return {key: Timing(t) for key, t in times.items()}
