"""Calibration for ``low_rank``: layer-input Grams, per-layer sensitivity, rank allocation.

``Probe`` lowers the graph to one ``torch.fx`` module with the layer inputs tapped, and swaps a
layer's weight buffer for its low-rank reconstruction ``B @ A`` (the same function as the
factorised pair) so sensitivity trials and sequential calibration never rebuild the module.

Sensitivity (ASVD-style): for every layer and candidate kept-parameter fraction, the layer alone is
replaced by its truncation and the graph's outputs are compared with the dense ones on the
calibration batches (mean over output rows of the relative squared error). ``allocate`` then picks
one option per layer (dense, or a candidate rank) minimising the summed sensitivity under a global
parameter budget: a Lagrangian sweep (each layer minimises ``s + λ·params``, λ bisected to the
budget) followed by greedy upgrades into the remaining slack.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from graphopt.ir import Graph, Value
from graphopt.ir.interpreter import to_fx
from graphopt.passes.low_rank_layers import Layer, rows_of


class Probe:
    def __init__(self, graph: Graph, layers: Sequence[Layer], extra: Sequence[Value] = ()):
        """Taps every layer's input, and the ``extra`` values."""
        self.layers = list(layers)
        self.taps: list[Value] = list(({id(l.input): l.input for l in self.layers}
                                       | {id(v): v for v in extra}).values())
        self.module = to_fx(graph, taps=self.taps)
        self.n_outputs = len(graph.outputs)
        by_tensor = {}
        for name, buf in self.module.named_buffers():
            by_tensor.setdefault(id(buf), name)
        self.buffer = {}
        for l in self.layers:
            if id(l.weight.const) not in by_tensor:
                raise RuntimeError(f"layer {l.name}: its weight is not a buffer of the lowered module")
            self.buffer[id(l)] = by_tensor[id(l.weight.const)]

    def set_matrix(self, layer: Layer, matrix: torch.Tensor | None) -> None:
        """Use ``matrix`` ([out, in]) for the layer's weight; None restores the original."""
        if matrix is None:
            tensor = layer.weight.const
        elif layer.kind == "linear":
            tensor = matrix.to(layer.weight.const.dtype)
        elif layer.kind == "matmul":
            tensor = matrix.t().contiguous().to(layer.weight.const.dtype)
        else:
            tensor = matrix.reshape(layer.weight.const.shape).to(layer.weight.const.dtype)
        setattr(self.module, self.buffer[id(layer)], tensor)

    def run(self, batch) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        with torch.no_grad():
            out = self.module(*batch)
        return list(out[: self.n_outputs]), {id(v): t for v, t in zip(self.taps, out[self.n_outputs:])}

    def outputs(self, batches) -> list[list[torch.Tensor]]:
        return [self.run(b)[0] for b in batches]

    def grams(self, batches, layers: Sequence[Layer] | None = None, dense: "Probe | None" = None
              ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], int]:
        """Per tapped input (by id of the Value): Xᵀ X / tokens in float64, and with ``dense`` the
        cross term X'ᵀ X_dense against the dense module's activations at the same place."""
        wanted = {id(l.input): l.kind for l in (layers or self.layers)}
        grams: dict[int, torch.Tensor] = {}
        cross: dict[int, torch.Tensor] = {}
        tokens = 0
        for batch in batches:
            _, taps = self.run(batch)
            dense_taps = dense.run(batch)[1] if dense is not None else None
            first = True
            for key, kind in wanted.items():
                x = rows_of(taps[key], kind).to(torch.float64)
                if first:
                    tokens += x.shape[0]
                    first = False
                g = x.t() @ x
                grams[key] = grams[key] + g if key in grams else g
                if dense_taps is not None:
                    xd = rows_of(dense_taps[key], kind).to(torch.float64)
                    c = x.t() @ xd
                    cross[key] = cross[key] + c if key in cross else c
        tokens = max(tokens, 1)
        return ({k: g / tokens for k, g in grams.items()}, {k: c / tokens for k, c in cross.items()}, tokens)


def row_error(reference: list[list[torch.Tensor]], actual: list[list[torch.Tensor]]) -> float:
    """Mean over float output rows (last axis) of ‖y' - y‖² / ‖y‖²."""
    total, count = 0.0, 0
    for ref_batch, act_batch in zip(reference, actual):
        for r, a in zip(ref_batch, act_batch):
            if not r.dtype.is_floating_point or r.numel() == 0:
                continue
            r2 = r.reshape(-1, r.shape[-1]).double() if r.dim() else r.reshape(1, 1).double()
            a2 = a.reshape(r2.shape).double()
            err = ((a2 - r2) ** 2).sum(-1) / (r2 ** 2).sum(-1).clamp_min(1e-30)
            total += float(err.sum())
            count += err.numel()
    return total / max(count, 1)


def row_cosine(reference: list[list[torch.Tensor]], actual: list[list[torch.Tensor]]) -> float:
    """Mean cosine similarity of float output rows (last axis)."""
    total, count = 0.0, 0
    for ref_batch, act_batch in zip(reference, actual):
        for r, a in zip(ref_batch, act_batch):
            if not r.dtype.is_floating_point or r.dim() == 0 or r.numel() == 0:
                continue
            cos = torch.nn.functional.cosine_similarity(a.reshape(-1, r.shape[-1]).double(),
                                                        r.reshape(-1, r.shape[-1]).double(), dim=-1)
            total += float(cos.sum())
            count += cos.numel()
    return total / max(count, 1)


@dataclass
class Option:
    rank: int | None      # None: keep the layer dense
    params: int
    sensitivity: float


def allocate(table: list[list[Option]], budget: float) -> tuple[list[Option], bool]:
    """One option per layer minimising summed sensitivity with total params <= budget.
    Returns (choice, reached) where ``reached`` is False when even the smallest options exceed it."""
    def pick(lam: float) -> list[Option]:
        return [min(opts, key=lambda o: (o.sensitivity + lam * o.params, o.params)) for opts in table]

    def total(choice) -> int:
        return sum(o.params for o in choice)

    smallest = [min(opts, key=lambda o: o.params) for opts in table]
    if total(smallest) > budget:
        return smallest, False
    choice = pick(0.0)
    if total(choice) > budget:
        lo, hi = 0.0, 1e-12
        while total(pick(hi)) > budget:
            hi *= 4.0
            if hi > 1e12:
                return smallest, total(smallest) <= budget
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            if total(pick(mid)) > budget:
                lo = mid
            else:
                hi = mid
        choice = pick(hi)
    # greedy: spend the remaining slack on the upgrades that buy the most sensitivity per parameter
    while True:
        slack = budget - total(choice)
        best, best_gain = None, 0.0
        for i, opts in enumerate(table):
            cur = choice[i]
            for o in opts:
                extra = o.params - cur.params
                if 0 < extra <= slack and o.sensitivity < cur.sensitivity:
                    gain = (cur.sensitivity - o.sensitivity) / extra
                    if gain > best_gain:
                        best, best_gain = (i, o), gain
        if best is None:
            return choice, True
        choice[best[0]] = best[1]


def monotone(sensitivities: list[float]) -> list[float]:
    """Sensitivities ordered from the highest rank to the lowest made non-decreasing (noise)."""
    out, running = [], 0.0
    for s in sensitivities:
        running = max(running, s)
        out.append(running)
    return out
