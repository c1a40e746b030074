"""The ACM gate: labels from the learners' errors, a linear classifier, thresholds for the budget.

Labels, with ``err_k`` = ||prefix_k(x) - module(x)|| per token. ``budget_labels`` (default): per token
the k minimising ``(err_k / ||module(x)||)² + lam * cost_k``, with one ``lam`` per module set so that the
labels themselves meet the budget: the budget goes where the relative error is (on all-MiniLM-L6-v2
at 0.75 the fitted gate reaches 0.982 mean cosine on these labels, 0.957 on the paper's; at 0.25 they
beat labels from one relative-error threshold, 0.77 against 0.69). ``labels`` (the ACM paper's): the smallest k after which the next learner
improves the error by less than ``ratio`` (``err_k / err_{k+1} < ratio``), else N. The gate is a multinomial logistic regression d -> N + 1 on
the module's input (standardised for the fit, folded back into the weights): a few dozen L-BFGS
steps, seconds on a CPU. Budget: the gate picks ``argmax_k(logit_k + beta * cost_k)`` with cost_k the
fraction of the module's FLOPs that k learners run; the argmax's k never decreases as beta grows, so
beta is bisected until the mean cost on the fitting tokens is the budget (the largest beta that does
not exceed it); beta * cost_k goes into the gate's bias.
"""
from __future__ import annotations

import torch


def labels(errors: torch.Tensor, ratio: float, min_k: int) -> torch.Tensor:
    """[rows] labels in min_k..N from [rows, N + 1] prefix errors."""
    n = errors.shape[1] - 1
    out = torch.full((errors.shape[0],), n, dtype=torch.long)
    decided = torch.zeros(errors.shape[0], dtype=torch.bool)
    for k in range(min_k, n):
        small = (errors[:, k] < ratio * errors[:, k + 1]) & ~decided
        out[small] = k
        decided |= small
    return out


def budget_labels(errors: torch.Tensor, scale: torch.Tensor, cost: torch.Tensor, budget: float,
                  min_k: int) -> torch.Tensor:
    """[rows] labels k >= min_k minimising ``(errors[:, k] / scale)² + lam * cost[k]`` per row, ``lam`` bisected
    so that the mean cost of the labels is at most ``budget``: the least total squared relative error the
    budget allows (the cost of a label never rises with lam)."""
    rel2 = (errors[:, min_k:] / scale.clamp_min(1e-12)[:, None]) ** 2
    tail = cost[min_k:]

    def pick(lam: float) -> torch.Tensor:
        return (rel2 + lam * tail).argmin(1) + min_k

    lo, hi = 0.0, 1.0
    while float(cost[pick(hi)].mean()) > budget and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(cost[pick(mid)].mean()) <= budget:
            hi = mid
        else:
            lo = mid
    return pick(hi)


def fit_classifier(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float = 1e-3,
                   steps: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (weights [classes, d], bias [classes]) in the input's units."""
    torch.manual_seed(seed)
    x = x.float()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(classes, x.shape[1], requires_grad=True)
    counts = torch.bincount(y, minlength=classes).float()
    b = torch.log((counts + 1) / (counts.sum() + classes)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.t() + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return (w / sd).float(), (b - (w / sd) @ mu).float()


def fit_error_regression(x: torch.Tensor, errors: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear predictor of each prefix's squared error (scaled by its mean over rows), as gate logits
    (the negated prediction): with beta * cost added, argmax picks argmin_k(predicted error + lambda cost)."""
    target = errors.double() ** 2
    target = target / target[:, 0].mean().clamp_min(1e-30)
    x64 = x.double()
    mu = x64.mean(0)
    xc = x64 - mu
    g = xc.t() @ xc
    lam = ridge * float(torch.diagonal(g).mean().clamp_min(1e-30))
    w = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=torch.float64), xc.t() @ (target - target.mean(0)))
    b = target.mean(0) - mu @ w
    return (-w.t()).float().contiguous(), (-b).float()


def choices(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, min_k: int) -> torch.Tensor:
    from graphopt.ir.ops.acm import gate_choice
    return gate_choice(x, w, b, min_k)


def calibrate(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, budget: float,
              min_k: int) -> tuple[torch.Tensor, float]:
    """The bias with beta * cost added so the mean cost of the chosen k on ``x`` is at most ``budget``
    (and as close to it as the tokens allow); and that mean."""
    logits = torch.addmm(b, x, w.t())

    def mean_cost(beta: float) -> float:
        k = (logits + beta * cost)[:, min_k:].argmax(-1) + min_k
        return float(cost[k].mean())

    lo, hi = -1.0, 1.0
    while mean_cost(lo) > budget and lo > -1e9:
        lo *= 4
    while mean_cost(hi) <= budget and hi < 1e9:
        hi *= 4
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if mean_cost(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return b + lo * cost, mean_cost(lo)
