"""``acm``: Adaptive Computation Modules, converted post-training from calibration data only.

    y = fc2(act(fc1(x)))    ->    k = acm_gate(x; w, b)            (0..N learners per token)
                                  y = acm(x, k; learners)          (sum of the first k learners)

Each transformer MLP found by the structure analysis (and, with ``modules``, the q/k/v/o
projections) becomes N ordered learners made from its own weights, so k = N is the original module
(``passes/acm_learners.py``), and a linear gate that picks k per token, fitted in seconds on labels
from the learners' errors and shifted to meet ``budget``, the mean fraction of the module's FLOPs, on
the calibration tokens (``passes/acm_gate.py``). MLPs allow k = 0 (the residual stream alone);
projections have no bypass and run at least one learner. The report gives, per module, the
distribution of k measured on calibration batches held out from fitting, and the op's cost formula
charges the expected FLOPs at those fractions.

Where the error came from (all-MiniLM-L6-v2, budget 0.75, 256 held-out sentences): an oracle gate
(true errors, one relative-error threshold per layer set on the evaluation tokens to run 0.75) reached
0.989 mean cosine with the old learners while the fitted gate on the paper's labels reached 0.957: the
gate was the main loss. Now (defaults): neurons ordered by activation std, each truncated prefix
compensated by its calibration mean error, gate labels that meet the budget by a relative-error
threshold, no refit (on MiniLM's narrow templated calibration text it halved the error on held-out
calibration batches but raised it on the evaluation sentences): mean cosine 0.982 at 0.75 (the gates
run 0.75 of the FLOPs on held-out calibration, 0.76 on the evaluation sentences), for an oracle gate
0.985-0.987 with these learners. The digits ViT (16k calibration tokens) gains from the refit
(``refit_prefixes=True``): 97.3% at budget 0.5 (0.53 of the MLP FLOPs run on held-out
calibration), as float; 94.9% without it. Figures: ``bench/acm.py``.

Composes with token_merge / token_drop and with low_rank in either order (a projection low_rank
already factorised is refused, naming it: converting it would undo the factorisation); on an integer-only graph it refuses (there is no integer ACM kernel), and integer_only refuses an
ACM graph for the same reason. Full-rank projection learners cost (m + n) / m·n per component, more
than the dense layer at k = N: projections only save at low k.
"""
from __future__ import annotations

from typing import Literal

import torch

from graphopt.ir import Graph
from graphopt.ir.interpreter import collect
from graphopt.ir.ops.acm import GATE, OP
from graphopt.passes.acm_gate import budget_labels, calibrate, choices, fit_classifier, fit_error_regression, labels
from graphopt.passes.acm_learners import (ACMError, Module, build_learners, compensate, find_modules,
                                          prefix_errors, refit)
from graphopt.passes.fuse_gelu import FUSE_GELU
from graphopt.passes.integer_only import IntegerConversionError
from graphopt.passes.integer_only.tokens import CONVERTERS
from graphopt.passes.low_rank import _split_holdout
from graphopt.passes.registry import PassConfigError, option, register_pass


@register_pass("acm", tolerance=None)
def acm(graph: Graph, ctx, *,
        n: int = option(4, "learners per module (N)"),
        split: list[float] = option(None, "the learners' share of the module's width (N numbers, normalised); "
                                          "default equal"),
        budget: float = option(0.5, "mean fraction of each module's FLOPs to run, in (0, 1]"),
        budgets: dict = option(None, "per-module budgets {block: b} or {'block.role': b} (role mlp, q, k, v, out)"),
        modules: list[str] = option(None, "which modules: mlp (default), q, k, v, out"),
        blocks: list[int] = option(None, "block indices to convert; default all"),
        refit_prefixes: bool = option(False, "refit the output weights of truncated prefixes (ridge least squares; "
                                             "overfits a narrow calibration set)"),
        compensation: bool = option(True, "add the calibration mean of what each truncated prefix misses as its bias"),
        ridge: float = option(0.05, "ridge of the refit (x mean Gram diagonal), pulling toward the original"),
        label_ratio: float = option(1.2, "gate=labels: the smallest k after which the next learner improves the "
                                         "error by less than this factor"),
        gate: Literal["budget", "labels", "errors"] = option(
            "budget", "budget: a classifier on labels that meet the budget by a relative-error threshold; labels: "
                      "a classifier on the paper's labels; errors: a linear regression of each prefix's error, "
                      "k = argmin(error + lambda cost)"),
        holdout: float = option(0.25, "fraction of calibration batches held out to measure k and the budget"),
        max_rows: int = option(16384, "calibration tokens used per module (evenly sampled)")):
    """ACM: per-token adaptive width from the module's own weights, a fitted gate, executed grouped by k."""
    if n < 1:
        raise PassConfigError(f"pass 'acm': option n={n} must be >= 1")
    if not 0.0 < budget <= 1.0:
        raise PassConfigError(f"pass 'acm': option budget={budget!r} must be in (0, 1]")
    if not 0.0 <= holdout < 1.0:
        raise PassConfigError(f"pass 'acm': option holdout={holdout!r} must be in [0, 1)")
    for rule, fired in FUSE_GELU.apply(graph).items():  # written-out GELUs (ONNX) become one gelu
        if fired:
            ctx.count(rule, fired)
    todo = find_modules(graph, list(modules or ["mlp"]), blocks)
    per_module = _budgets(todo, budget, budgets or {})
    fit_batches, held = _split_holdout(ctx.require_calibration(), holdout)
    fit_x = _inputs(graph, todo, fit_batches, max_rows)
    held_x = _inputs(graph, todo, held, max_rows) if held else fit_x
    where = f"{len(held)} held-out calibration batches" if held else "the fitting batches (no batch held out)"
    details = ctx.details.setdefault("acm", {})
    summary = []
    for m in todo:
        x, xh = fit_x[id(m)], held_x[id(m)]
        build_learners(m, x, n, split, spare=compensation)
        if refit_prefixes and n > 1:
            refit(m, x, ridge)
        if compensation:
            compensate(m, x)
        cost = torch.tensor([s * m.unit_flops / m.dense_flops_per_row for s in m.splits], dtype=torch.float32)
        errors = prefix_errors(m, x)
        if gate == "budget":
            y = budget_labels(errors, errors[:, 0], cost, per_module[id(m)], m.min_k)  # errors[:, 0] = ||module(x)||
        else:
            y = labels(errors, label_ratio, m.min_k)
        w, b = fit_error_regression(x, errors) if gate == "errors" else fit_classifier(x, y, n + 1)
        b, fit_mean = calibrate(x, w, b, cost, per_module[id(m)], m.min_k)
        k = choices(xh, w, b, m.min_k)
        hist = torch.bincount(k, minlength=n + 1).double() / max(1, k.numel())
        fractions = tuple(float(hist[i + 1:].sum()) for i in range(n))
        measured = float((hist * cost.double()).sum())
        _rewrite(graph, m, w, b, fractions)
        dist = " ".join(f"{i}:{p:.0%}" for i, p in enumerate(hist.tolist()))
        ctx.note(f"{m.name}: k = {dist} (mean {sum(fractions):.2f} of {n}): {measured:.2f} of its FLOPs "
                 f"(budget {per_module[id(m)]:.2f})" + ("; " + "; ".join(m.notes) if m.notes else ""))
        details[m.name] = {"block": m.block, "role": m.role, "budget": per_module[id(m)], "fit_fraction": fit_mean,
                           "measured_fraction": measured, "k_distribution": hist.tolist(), "splits": list(m.splits),
                           "label_distribution": (torch.bincount(y, minlength=n + 1).double() / y.numel()).tolist()}
        summary.append((m.dense_flops_per_row, measured))
        if measured > per_module[id(m)] + 0.05:
            ctx.note(f"WARNING: {m.name} runs {measured:.2f} of its FLOPs on {where}, over its budget")
        ctx.count("converted")
    graph.remove_dead()
    graph.remove_unused_constants()
    total = sum(f for f, _ in summary)
    kept = sum(f * r for f, r in summary) / total if total else 1.0
    ctx.notes.insert(0, f"{len(todo)} modules, N = {n}: {kept:.3f} of their FLOPs run on {where} (requested {budget:g}); "
             "k per module measured there")
    graph.meta["acm_kept_fraction"] = kept


def _budgets(todo: list[Module], budget: float, table: dict) -> dict[int, float]:
    out = {id(m): budget for m in todo}
    for key, value in table.items():
        text = str(key)
        block, _, role = text.partition(".")
        try:
            index = int(block)
            value = float(value)
        except ValueError:
            raise PassConfigError(f"pass 'acm': option budgets: key {text!r} must be a block index or "
                                  f"'block.role' and its value a number") from None
        if not 0.0 < value <= 1.0:
            raise PassConfigError(f"pass 'acm': option budgets: {text}={value} must be in (0, 1]")
        hit = [m for m in todo if m.block == index and (not role or m.role == role)]
        if not hit:
            raise PassConfigError(f"pass 'acm': option budgets: {text!r} names no converted module; converted: "
                                  f"{sorted({f'{m.block}.{m.role}' for m in todo})}")
        for m in hit:
            out[id(m)] = value
    return out


def _inputs(graph: Graph, todo: list[Module], batches, max_rows: int) -> dict[int, torch.Tensor]:
    """Each module's input rows over the batches (float32), evenly subsampled to ``max_rows``."""
    values = list({id(m.x): m.x for m in todo}.values())
    rows: dict[str, list[torch.Tensor]] = {v.name: [] for v in values}
    for found in collect(graph, batches, values):
        for name, t in found.items():
            rows[name].append(t.detach().reshape(-1, t.shape[-1]).float())
    out = {}
    for m in todo:
        x = torch.cat(rows[m.x.name])
        if x.shape[0] > max_rows:
            x = x[torch.linspace(0, x.shape[0] - 1, max_rows).long()]
        out[id(m)] = x
    return out


def _rewrite(graph: Graph, m: Module, w: torch.Tensor, b: torch.Tensor, fractions) -> None:
    dt = m.dtype
    const = lambda t, name: graph.add_constant(t.to(dt).contiguous(), f"acm.{name}")  # noqa: E731
    anchor = m.y.producer
    with graph.inserting_before(anchor):
        k = graph.create_node(GATE, [m.x, const(w, "gate_w"), const(b, "gate_b")], {"min_k": m.min_k}).output
        inputs = [m.x, k, const(m.w1, "w1"), const(m.b1, "b1"), const(m.w2, "w2"), const(m.b2, "b2"),
                  const(m.wg, "wg") if m.wg is not None else None, const(m.bg, "bg") if m.bg is not None else None,
                  const(m.w2r, "w2r") if m.w2r is not None else None]
        while inputs[-1] is None:
            inputs.pop()
        node = graph.create_node(OP, inputs, {"splits": tuple(m.splits), "activation": m.activation,
                                              "fractions": tuple(fractions)})
        node.meta["module"] = m.name
    graph.replace_all_uses_with(m.y, node.output)


def _no_integer_acm(converter, node):
    raise IntegerConversionError(
        f"{node.op} (an ACM made by the acm pass) has no integer form: its learners would need integer GEMMs over "
        "groups of tokens with a requantisation per learner and its gate an integer argmax, and there is no such "
        "kernel; run integer_only on the model without acm, or acm without integer_only")


CONVERTERS.setdefault(OP, _no_integer_acm)  # integer_only refuses an ACM graph, naming the reason
CONVERTERS.setdefault(GATE, _no_integer_acm)

__all__ = ["ACMError", "acm"]
