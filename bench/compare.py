"""How a candidate is put against the others: time ratios against each baseline, and how far its
output is from torch float on the benchmark input (so a fast but wrong peer shows)."""
from __future__ import annotations

import statistics

import numpy as np


def ratios(median: dict[str, float], baselines: list[str]) -> dict[str, dict[str, float]]:
    """``ratios[k]["vs_" + b]`` = baseline time / k's time (above 1: k is faster), for the baselines measured."""
    return {k: {"vs_" + b: median[b] / t for b in baselines if b in median} for k, t in median.items()}


def paired_ratios(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Per interleaved round, the baseline's time / each candidate's time in that round: its median and its 10th
    and 90th percentiles. Rounds ran close together, so a shift in the machine's speed between rounds (a noisy
    neighbour) moves both times of a pair, and the spread says how far one run's ratio can be trusted."""
    base = times[baseline]
    out = {}
    for k, t in times.items():
        if k == baseline or len(t) != len(base):
            continue
        r = sorted(b / x for b, x in zip(base, t))
        q = statistics.quantiles(r, n=10, method="inclusive") if len(r) > 1 else [r[0]] * 9
        out[k] = {"median": statistics.median(r), "p10": q[0], "p90": q[-1]}
    return out


def slowdown(unloaded: dict[str, float], loaded: dict[str, float]) -> dict[str, float]:
    """Loaded time / unloaded time of each candidate measured both ways (each against its own time)."""
    return {k: loaded[k] / unloaded[k] for k in unloaded if k in loaded}


def agreement(reference, output, mask=None) -> dict[str, float]:
    """Cosine of the whole output with the reference and, per row, how often the argmax agrees
    (logits [batch, classes]); for hidden states [batch, seq, dim] with an attention ``mask``
    [batch, seq], the cosine over the real tokens only, and of each row's masked-mean embedding instead of
    the argmax (mean and min over rows)."""
    ref, out = np.asarray(reference, np.float64), np.asarray(output, np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"output shape {out.shape} differs from the reference's {ref.shape}")
    result = {"cosine": _cos(ref.ravel(), out.ravel())}
    if mask is None:
        result["argmax_agreement"] = float((ref.argmax(-1) == out.argmax(-1)).mean())
        return result
    m = np.asarray(mask, np.float64)[..., None]
    ref_e, out_e = (ref * m).sum(1) / m.sum(1), (out * m).sum(1) / m.sum(1)
    rows = [_cos(a, b) for a, b in zip(ref_e, out_e)]
    real = np.asarray(mask, bool)
    return result | {"cosine_real_tokens": _cos(ref[real].ravel(), out[real].ravel()),
                     "embedding_cosine_mean": float(np.mean(rows)), "embedding_cosine_min": float(np.min(rows))}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))
