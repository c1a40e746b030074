"""The benchmark's comparison helpers (bench/compare.py, bench/peers.py, bench/under_load.py) on
hand-computed cases; nothing here is timed."""
import math
import os
import time

import numpy as np
import pytest

from graphopt.bench.compare import agreement, paired_ratios, ratios, slowdown
from graphopt.bench.peers import _by_position
from graphopt.bench.under_load import CoreShares, busy_cores


def test_ratios_are_baseline_over_candidate_for_measured_baselines():
    got = ratios({"ours": 100.0, "ov": 150.0, "ort": 50.0}, ["ov", "ort", "absent"])
    assert got == {"ours": {"vs_ov": 1.5, "vs_ort": 0.5}, "ov": {"vs_ov": 1.0, "vs_ort": 1 / 3},
                   "ort": {"vs_ov": 3.0, "vs_ort": 1.0}}


def test_paired_ratios_pair_each_round_and_not_the_medians():
    # round 2 ran on a slow machine for both: per round ov / ours is 1.2, 1.2, 1.25, 1.0 (a drift the medians mix up)
    times = {"ours": [1.0, 1.0, 2.0, 1.2], "ov": [1.2, 1.2, 2.5, 1.2], "short": [1.0]}
    got = paired_ratios(times, "ov")
    assert set(got) == {"ours"}                            # the baseline itself, and a candidate missing rounds, left out
    assert got["ours"]["median"] == pytest.approx(1.2)
    assert got["ours"]["p10"] == pytest.approx(1.0 + 0.3 * 0.2)   # numpy's linear quantile of [1.0, 1.2, 1.2, 1.25]
    assert got["ours"]["p90"] == pytest.approx(1.2 + 0.7 * 0.05)


def test_slowdown_is_each_candidates_own_loaded_over_unloaded_time():
    assert slowdown({"ours": 100.0, "ov": 140.0, "gone": 1.0}, {"ours": 400.0, "ov": 280.0}) == {"ours": 4.0, "ov": 2.0}


def test_agreement_on_logits_counts_argmax_per_row():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    out = np.array([[2.0, 0.0], [1.0, 0.0]])  # row 0 agrees, row 1 flips
    got = agreement(ref, out)
    assert got["argmax_agreement"] == 0.5
    assert got["cosine"] == pytest.approx(2 / (math.sqrt(2) * math.sqrt(5)))


def test_agreement_with_mask_pools_only_real_tokens():
    ref = np.array([[[1.0, 0.0], [9.0, 9.0]]])            # the second token is padding
    out = np.array([[[2.0, 0.0], [-9.0, 5.0]]])           # padding differs wildly, the real token only in scale
    got = agreement(ref, out, mask=np.array([[1, 0]]))
    assert got["embedding_cosine_mean"] == pytest.approx(1.0) and got["embedding_cosine_min"] == pytest.approx(1.0)
    assert got["cosine"] < 0.5  # the whole output, padding included, does not agree
    assert got["cosine_real_tokens"] == pytest.approx(1.0)


def test_agreement_refuses_a_different_shape():
    with pytest.raises(ValueError, match=r"output shape \(3,\) differs"):
        agreement(np.zeros(2), np.zeros(3))


def test_feed_matched_by_name_else_by_position():
    a, b = np.zeros(1), np.ones(1)
    assert list(_by_position({"x": a, "m": b}, ["m", "x"])) == ["m", "x"]
    assert _by_position({"x": a, "m": b}, ["input", "mask"]) == {"input": a, "mask": b}
    with pytest.raises(ValueError, match=r"cannot match the inputs \['x'\] to the ONNX inputs \['p', 'q'\]"):
        _by_position({"x": a}, ["p", "q"])


def test_busy_cores_runs_a_child_only_inside_the_with():
    with busy_cores(1) as child:
        assert child.poll() is None
    assert child.poll() is not None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="the load process's CPU time is read from /proc")
def test_core_shares_tell_a_sleeping_call_from_a_spinning_one():
    def spin():
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            pass
    with busy_cores(1) as child:
        shares = CoreShares(child.pid)
        calls = {"sleeps": shares.wrap("sleeps", lambda: time.sleep(0.3)), "spins": shares.wrap("spins", spin)}
        for _ in range(2):
            for call in calls.values():
                call()
    got = shares.cores()
    assert got["sleeps"]["this_process"] < 0.2 < 0.5 < got["spins"]["this_process"] < 1.5
    assert got["sleeps"]["load_process"] > 0.4 and got["spins"]["load_process"] > 0.2   # it kept running throughout
