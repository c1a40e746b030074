"""``low_rank``: factorise linear (and 1x1 conv) weights into two thin factors.

    linear(x, W[m,n], b)  ->  linear(linear(x, A[r,n]), B[m,r], b)
    matmul(x, W[n,m])     ->  matmul(matmul(x, Aᵀ), Bᵀ)
    conv2d(x, W[m,n,1,1]) ->  conv2d(conv2d(x, A[r,n,1,1]), B[m,r,1,1], b)

Rank per layer: ``ratio`` (kept-parameter fraction, r = floor(ratio·mn/(m+n))), ``energy`` (kept
spectral energy, whitened when activation-aware) or ``ranks`` (explicit {layer pattern: rank}).
A layer whose factorisation would not cost fewer FLOPs than the dense layer by the cost model
(r >= mn/(m+n)) is left dense and listed in the report.

``method=svd_llm`` whitens with the calibration activations (SVD-LLM), ``method=svd`` is plain
truncated SVD. ``allocation=sensitivity`` spreads the global budget (``ratio`` of the selected
layers' parameters) by measured per-layer sensitivity (ASVD-style); ``sequential=true`` computes
each layer's whitening from the activations of the already-compressed layers before it (and with
``correct=true`` also refits the weight to the dense layer's output on that input; layers kept
dense are refitted the same way, at no parameter cost).

The report ends with the output cosine against the dense model on calibration batches held out from
fitting (``holdout``; measured on the fitting batches it is optimistic: it rewards fitting the
calibration data) and says plainly when the model does not compress well at the requested budget.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Literal

import torch

from graphopt.passes.low_rank_calib import Option, Probe, allocate, monotone, row_cosine, row_error
from graphopt.passes.low_rank_factor import (Decomposition, break_even, corrected_weight, kept_params, plain_svd,
                                             rank_for_ratio, whitened_svd)
from graphopt.passes.low_rank_layers import Layer, find_layers, reduces_cost, replace_weight, rewrite, select_layers
from graphopt.passes.registry import PassConfigError, option, register_pass

DEFAULT_CANDIDATES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
# "does not compress well": output rows below this cosine, or more than this share of the output's energy
# in the error (all-MiniLM-L6-v2 at half its parameters keeps row cosine 0.95 but loses ~10% of the energy,
# and its pooled sentence embeddings fall to cosine 0.80)
POOR_COSINE = 0.95
POOR_RELATIVE_ERROR = 0.05


def _check_fraction(name: str, value: float, allow_zero: bool = False) -> None:
    ok = (0.0 <= value <= 1.0) if allow_zero else (0.0 < value <= 1.0)
    if not ok:
        interval = "[0, 1] (0 switches it off)" if allow_zero else "(0, 1]"
        raise PassConfigError(f"pass 'low_rank': option {name}={value!r} must be in {interval}")


@register_pass("low_rank", tolerance=None)
def low_rank(graph, ctx, *,
             method: Literal["svd", "svd_llm"] = option("svd_llm", "svd: plain truncated SVD; svd_llm: whitened by "
                                                                   "the calibration activations"),
             ratio: float = option(0.5, "kept-parameter fraction in (0, 1]: per layer (uniform) or the global "
                                        "budget (allocation=sensitivity)"),
             energy: float = option(0.0, "if > 0: per-layer rank keeping this fraction of the spectral energy"),
             ranks: dict = option(None, "explicit {layer name pattern: rank}; only the layers it names are factorised"),
             layers: list[str] = option(None, "layer name globs (or 're:REGEX') to factorise; default all"),
             exclude: list[str] = option(None, "layer name globs to leave alone"),
             roles: list[str] = option(None, "structure roles to factorise: attention, qkv, q, k, v, out, mlp, "
                                             "fc1, fc2, gate, other"),
             allocation: Literal["uniform", "sensitivity"] = option("uniform", "uniform ratio per layer, or the "
                                                                                "budget spread by measured sensitivity"),
             sequential: bool = option(False, "whiten each layer with the activations of the already-compressed "
                                              "layers before it"),
             correct: bool = option(False, "with sequential: refit each weight (factorised or kept dense) to the "
                                           "dense output on the new input"),
             candidates: list[float] = option(None, "kept fractions tried per layer by the sensitivity search"),
             sensitivity_batches: int = option(8, "calibration batches used to measure sensitivity"),
             sensitivity_file: str = option("", "JSON cache of the measured sensitivities (read if it matches)"),
             ridge: float = option(1e-3, "ridge (x mean Gram diagonal) of the correction's least squares"),
             holdout: float = option(0.2, "fraction of the calibration batches kept out of fitting to estimate the "
                                          "output quality without bias (0: estimate on the fitting batches)"),
             ):
    """Low-rank factorisation of linear / 1x1 conv weights (plain SVD or SVD-LLM, allocated, sequential)."""
    _check_fraction("ratio", ratio)
    _check_fraction("energy", energy, allow_zero=True)
    if not 0.0 <= holdout < 1.0:
        raise PassConfigError(f"pass 'low_rank': option holdout={holdout!r} must be in [0, 1) (0 switches it off)")
    cands = sorted(set(candidates or DEFAULT_CANDIDATES), reverse=True)
    for c in cands:
        _check_fraction("candidates", c)
    if sensitivity_batches < 1:
        raise PassConfigError(f"pass 'low_rank': option sensitivity_batches={sensitivity_batches} must be >= 1")
    if correct and not sequential:
        raise PassConfigError("pass 'low_rank': option correct=true needs sequential=true")
    if ranks and (allocation != "uniform" or energy):
        raise PassConfigError("pass 'low_rank': option ranks cannot be combined with allocation=sensitivity or energy")
    if energy and allocation != "uniform":
        raise PassConfigError("pass 'low_rank': option energy cannot be combined with allocation=sensitivity")

    everything = find_layers(graph)
    if not everything:
        raise ValueError("no factorisable layer: the graph has no float linear, constant-weight matmul or 1x1 conv2d "
                         "(an integer_only graph's int.linear are not: run this pass before integer_only)")
    chosen = select_layers(everything, list(layers or []), list(exclude or []), list(roles or []))
    explicit: dict[int, int] = {}
    if ranks:
        chosen = _apply_rank_map(chosen, ranks, explicit)

    needs_calibration = method == "svd_llm" or allocation == "sensitivity" or sequential
    batches, held_out = _split_holdout(ctx.require_calibration(), holdout) if needs_calibration else ([], [])
    dense_probe = Probe(graph, chosen) if needs_calibration else None

    # 1. decompositions on the dense model's activations
    decomp: dict[int, Decomposition] = {}
    grams = {}
    if method == "svd_llm":
        grams, _, tokens = dense_probe.grams(batches)
        ctx.note(f"calibration: {len(batches)} batches for fitting, {tokens} rows per layer input; "
                 f"{len(held_out)} held out for the quality estimate")
    for l in chosen:
        decomp[id(l)] = whitened_svd(l.matrix, grams[id(l.input)]) if method == "svd_llm" else plain_svd(l.matrix)
        if decomp[id(l)].fallback:
            ctx.note(f"{l.name}: {decomp[id(l)].fallback}")
            ctx.count("whitening_fallbacks")

    # 2. ranks
    rank: dict[int, int | None] = {}
    total_params = sum(l.shape[0] * l.shape[1] for l in chosen)
    if ranks:
        rank.update(explicit)
    elif energy:
        for l in chosen:
            rank[id(l)] = decomp[id(l)].rank_for_energy(energy)
    elif allocation == "uniform":
        for l in chosen:
            rank[id(l)] = rank_for_ratio(*l.shape, ratio)
    else:
        step = max(1, len(batches) // sensitivity_batches)  # spread over the set (it may be sorted by length)
        table = _sensitivity_table(graph, chosen, decomp, dense_probe, batches[::step][:sensitivity_batches], cands,
                                   method, sensitivity_file, ctx)
        choice, reached = allocate(table, ratio * total_params)
        if not reached:
            ctx.note(f"budget {ratio:g} cannot be met with candidates down to {min(cands):g}; using the smallest")
        for l, o in zip(chosen, choice):
            rank[id(l)] = o.rank

    # 3. leave alone what would not get cheaper
    todo: list[Layer] = []
    layers_detail = ctx.details.setdefault("layers", {})
    for l in chosen:
        m, n = l.shape
        r = rank[id(l)]
        layers_detail[l.name] = {"shape": [m, n], "role": l.role, "rank": None, "full_rank": min(m, n),
                                 "kept_fraction": 1.0, "break_even": break_even(m, n)}
        if r is None:
            layers_detail[l.name]["dense_reason"] = "kept dense by the allocation (most sensitive)"
            ctx.note(f"{l.name} [{m}x{n}]: kept dense by the allocation (most sensitive)")
            ctx.count("kept_dense_by_allocation")
        elif r >= break_even(m, n) or not reduces_cost(l, r):
            layers_detail[l.name]["dense_reason"] = f"rank {r} would not cost less than the dense matrix"
            ctx.note(f"{l.name} [{m}x{n}]: left dense: rank {r} >= mn/(m+n) = {break_even(m, n):.1f}, "
                     "the factors would not cost less")
            ctx.count("left_dense_no_saving")
        else:
            todo.append(l)

    # 4. factors (sequential: re-whitened with the compressed model's activations, in graph order);
    #    with correct=true the layers left dense are refitted to the dense output too (same parameters)
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    refit: dict[int, torch.Tensor] = {}
    if sequential and todo:
        touched = [l for l in chosen if correct or l in todo]
        work = Probe(graph, touched)
        groups: dict[int, list[Layer]] = {}
        for l in touched:  # graph order; layers reading the same input share one calibration run
            groups.setdefault(id(l.input), []).append(l)
        for group in groups.values():
            g, c, _ = work.grams(batches, group, dense=dense_probe if correct else None)
            for l in group:
                if l not in todo:
                    if not torch.equal(g[id(l.input)], c[id(l.input)]):  # else its input is unchanged
                        refit[id(l)] = corrected_weight(l.matrix, g[id(l.input)], c[id(l.input)], ridge)
                        work.set_matrix(l, refit[id(l)])
                    continue
                d = whitened_svd(l.matrix, g[id(l.input)], c.get(id(l.input)), ridge) if method == "svd_llm" \
                    else decomp[id(l)]
                if d.fallback and d is not decomp[id(l)]:
                    ctx.note(f"{l.name} (sequential): {d.fallback}")
                factors[id(l)] = d.factors(rank[id(l)], l.weight.const.dtype)
                a, b = factors[id(l)]
                work.set_matrix(l, b @ a)
    else:
        for l in todo:
            factors[id(l)] = decomp[id(l)].factors(rank[id(l)], l.weight.const.dtype)

    # 5. measure what it did, on held-out batches when there are any, then rewrite
    kept = sum(kept_params(*l.shape, rank[id(l)]) if l in todo else l.shape[0] * l.shape[1] for l in chosen)
    if needs_calibration and todo:
        judged = held_out or batches
        where = (f"{len(held_out)} held-out calibration batches" if held_out else
                 "the fitting batches (optimistic: no batch held out)")
        reference = dense_probe.outputs(judged)
        refitted = [l for l in chosen if id(l) in refit]
        check = Probe(graph, todo + refitted)
        for l in todo:
            a, b = factors[id(l)]
            check.set_matrix(l, b @ a)
        for l in refitted:
            check.set_matrix(l, refit[id(l)])
        approx = check.outputs(judged)
        cosine, err = row_cosine(reference, approx), row_error(reference, approx)
        ctx.note(f"output on {where}: mean row cosine {cosine:.4f}, mean relative squared error {err:.3g}")
        if cosine < POOR_COSINE or err > POOR_RELATIVE_ERROR:
            ctx.note(f"WARNING: this model does not compress well at {kept / total_params:.0%} kept parameters "
                     f"(output cosine {cosine:.3f}, relative squared error {err:.3f} on {where}; limits "
                     f"{POOR_COSINE} and {POOR_RELATIVE_ERROR}); keep more parameters, "
                     "use allocation=sensitivity sequential=true, or fine-tune after factorising")
        graph.meta["low_rank_output_cosine"] = cosine
        graph.meta["low_rank_cosine_held_out"] = bool(held_out)
    for l in todo:
        a, b = factors[id(l)]
        m, n = l.shape
        ctx.note(f"{l.name} [{m}x{n}] ({l.role}): rank {a.shape[0]} ({a.shape[0] * (m + n) / (m * n):.0%} "
                 f"of its parameters)")
        layers_detail[l.name].update(rank=a.shape[0], kept_fraction=a.shape[0] * (m + n) / (m * n))
        rewrite(graph, l, a, b)
        ctx.count("factorised")
    for l in chosen:
        if id(l) in refit:
            ctx.note(f"{l.name}: kept dense, refitted to the dense output on the compressed input")
            layers_detail[l.name]["dense_reason"] = "kept dense, refitted to the dense output on the compressed input"
            replace_weight(graph, l, refit[id(l)])
            ctx.count("refitted_dense")
    graph.remove_unused_constants()
    ctx.note(f"kept parameters: {kept}/{total_params} = {kept / total_params:.1%} of the selected layers "
             f"({len(todo)} factorised, {len(chosen) - len(todo)} dense)")
    graph.meta["low_rank_kept_fraction"] = kept / total_params


def _split_holdout(batches: list, fraction: float) -> tuple[list, list]:
    """(fitting, held-out) batches; held-out ones evenly spread (the set may be sorted by length), at
    least one batch kept for fitting."""
    k = min(round(fraction * len(batches)), len(batches) - 1)
    if k <= 0:
        return list(batches), []
    held = {int((i + 0.5) * len(batches) / k) for i in range(k)}
    return ([b for i, b in enumerate(batches) if i not in held], [b for i, b in enumerate(batches) if i in held])


def _apply_rank_map(chosen: list[Layer], ranks: dict, explicit: dict[int, int]) -> list[Layer]:
    from graphopt.passes.low_rank_layers import select_layers as _select

    picked: list[Layer] = []
    for pattern, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise PassConfigError(f"pass 'low_rank': option ranks: rank for {pattern!r} must be a positive integer, "
                                  f"got {r!r}")
        try:
            hit = _select(chosen, [str(pattern)], [], [])
        except ValueError as e:
            raise PassConfigError(f"pass 'low_rank': option ranks: {e}") from None
        for l in hit:
            explicit[id(l)] = r
            if l not in picked:
                picked.append(l)
    return [l for l in chosen if l in picked]


def _sensitivity_table(graph, chosen, decomp, probe: Probe, batches, cands, method, path, ctx) -> list[list[Option]]:
    key = _cache_key(chosen, batches, cands, method)
    if path and os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            ctx.note(f"sensitivities read from {path}")
            return [[Option(o["rank"], o["params"], o["sensitivity"]) for o in opts] for opts in cached["table"]]
        ctx.note(f"{path} is for another model, layer set or calibration; measuring again")
    reference = probe.outputs(batches)
    table = []
    for l in chosen:
        m, n = l.shape
        options = [Option(None, m * n, 0.0)]
        measured = []
        for c in cands:
            r = rank_for_ratio(m, n, c)
            if measured and measured[-1][0] == r:
                continue
            probe.set_matrix(l, decomp[id(l)].approximation(r, l.weight.const.dtype))
            measured.append((r, row_error(reference, probe.outputs(batches))))
        probe.set_matrix(l, None)
        for (r, _), s in zip(measured, monotone([s for _, s in measured])):
            options.append(Option(r, r * (m + n), s))
        table.append(options)
        ctx.count("sensitivity_trials", len(measured))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"key": key, "layers": [l.name for l in chosen],
                       "table": [[o.__dict__ for o in opts] for opts in table]}, f)
    return table


def _cache_key(chosen, batches, cands, method) -> str:
    h = hashlib.sha256()
    h.update(method.encode())
    h.update(repr(cands).encode())
    for l in chosen:
        w = l.weight.const
        h.update(l.name.encode())
        h.update(repr(tuple(w.shape)).encode())
        h.update(w.detach().float().reshape(-1)[:4096].numpy().tobytes())
    for b in batches:
        for t in b:
            h.update(repr(tuple(t.shape)).encode())
            h.update(t.detach().reshape(-1)[:4096].contiguous().numpy().tobytes())
    return h.hexdigest()
