"""OWL allocation for ``sparsify`` (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity").

Why: Wanda's score |W_ij|·‖X_j‖ has a few very large entries ("outliers") whose removal costs much more
than the rest, and they are not spread evenly over the model. OWL gives a block a lower sparsity the more of
them it holds: its outlier ratio D = share of its scores above ``threshold`` x their mean (the block's
layers' scores taken together), then the blocks' keep ratios spread linearly over a range of 2·``spread``
(the block with the fewest outliers the sparsest), shifted so the weighted mean sparsity is the budget.
The paper's mean is unweighted (equal decoder blocks); weighting by each block's weight count keeps the
budget exact when blocks differ in size. Nothing is measured on the model's outputs: one pass over the scores.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

_BLOCK = re.compile(r"(.*\.\d+)(?:\.|$)")


def block_of(name: str) -> str:
    """The block a layer belongs to: its name up to the last numbered component
    (``bert.encoder.layer.3.attention.self.query`` -> ``bert.encoder.layer.3``), else the name itself."""
    m = _BLOCK.match(name)
    return m.group(1) if m else name


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """Share of all the entries of ``scores`` above ``threshold`` x their common mean."""
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    return float((flat > threshold * flat.mean()).double().mean())


def owl_sparsities(ratios: Sequence[float], sizes: Sequence[int], sparsity: float, spread: float) -> list[float]:
    """Per-block sparsity: the outlier ratios scaled to [0, 2·spread] (more outliers, more kept), minus
    their ``sizes``-weighted mean, subtracted from ``sparsity``; the weighted mean sparsity is ``sparsity``."""
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return [sparsity] * len(ratios)
    kept_more = [(r - lo) / (hi - lo) * 2 * spread for r in ratios]
    centre = sum(k * n for k, n in zip(kept_more, sizes)) / sum(sizes)
    out = [sparsity - (k - centre) for k in kept_more]
    if min(out) < 0 or max(out) >= 1:
        raise ValueError(f"OWL spread {spread} takes a block's sparsity out of [0, 1) ({min(out):.3f} .. "
                         f"{max(out):.3f}); lower it")
    return out
