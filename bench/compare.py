"""How a candidate is put against the others: time ratios against each baseline, and how far its
output is from torch float on the benchmark input (so a fast but wrong peer shows)."""
from __future__ import annotations

import numpy as np


def ratios(median: dict[str, float], baselines: list[str]) -> dict[str, dict[str, float]]:
    """``ratios[k]["vs_" + b]`` = baseline time / k's time (above 1: k is faster), for the baselines measured."""
    return {k: {"vs_" + b: median[b] / t for b in baselines if b in median} for k, t in median.items()}


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
