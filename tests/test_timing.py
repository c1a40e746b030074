"""graphopt.timing's policy, checked by the order of the calls it makes (never by how long they take)."""
import numpy as np
import pytest

from graphopt.timing import Timing, interleaved


def test_warmup_rounds_then_alternating_rounds_with_a_settling_call_per_visit():
    calls = []
    timings = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"),
                           "c": lambda: calls.append("c")}, runs=3, warmup=2)
    warmup = ["a", "b", "c"] * 2
    forward = ["a", "a", "b", "b", "c", "c"]  # each visit: one untimed call, then the timed one
    assert calls == warmup + forward + forward[::-1] + forward
    assert {k: len(t.times) for k, t in timings.items()} == {"a": 3, "b": 3, "c": 3}


def test_statistics_match_numpy():
    times = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.4]
    t = Timing(times)
    assert t.median == np.median(times)
    assert t.p10 == pytest.approx(np.quantile(times, 0.1))
    assert t.p90 == pytest.approx(np.quantile(times, 0.9))
    assert Timing([0.25]).p10 == Timing([0.25]).p90 == 0.25


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="runs must be at least 1"):
        interleaved({"a": lambda: None}, runs=0)
