"""Which modules ``acm`` converts, and their learners built from the module's own weights.

An MLP is a sum over its hidden neurons, so N ordered groups of neurons (fc1 rows + fc2 columns) are
N learners whose sum is the MLP exactly. Neurons are ordered by a calibration score, the standard
deviation of the activation x ||fc2 column||, so the first learners carry most of the output's
variation across tokens (what a dropped neuron's mean carried, ``compensate`` puts back; on
all-MiniLM-L6-v2 this ordering beat mean |activation| x ||fc2 column||). A projection
(q/k/v/o) has no hidden neurons: its learners are groups of its activation-aware SVD's components
(SVD-LLM whitening; identity activation), ordered by singular value, all of them the layer again.

``refit``: the output weights of each truncated prefix refitted in closed form (ridge least squares,
pulled toward the original weights) on the calibration rows, learner after learner, to the part of
the module's output the learners before it missed. Rows that run every learner keep the original
weights, so k = N stays the module itself.

``compensate``: a prefix that drops learners also drops their mean output (GELU/SiLU outputs have a
non-zero mean), a systematic error the same for every token. Each truncated prefix k gets the
calibration mean of what it misses as a bias, carried by one constant neuron appended to each learner
(fc1 row zero, fc1 bias 1, so its activation is act(1)); its output column is zero in ``w2`` (k = N
stays exact) and in ``w2r`` the step between consecutive prefixes' biases, so the prefix sum carries
exactly bias_k. No kernel changes; it costs one neuron per learner (``build_learners(spare=True)`` leaves
room for it, so the learners keep their widths).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graphopt.ir import Graph, Value
from graphopt.ir.ops.low_rank import ACTIVATIONS, activate
from graphopt.ir.structure import MLP, Projection, StructureError, analyze
from graphopt.passes.low_rank_factor import whitened_svd

ROLES = ("mlp", "q", "k", "v", "out")
GATED_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "sigmoid": None}


class ACMError(ValueError):
    """The model lacks what ``acm`` needs; the message names what was missing."""


@dataclass
class Module:
    """One module to convert: an MLP (activation set) or a projection (activation ``none``)."""
    name: str
    block: int
    role: str
    x: Value                  # the module's input
    y: Value                  # the value its output replaces
    w1: torch.Tensor          # [H, d]
    b1: torch.Tensor          # [H]
    w2: torch.Tensor          # [m, H]
    b2: torch.Tensor          # [m]
    activation: str
    wg: torch.Tensor | None = None
    bg: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32
    min_k: int = 0
    splits: tuple[int, ...] = ()
    w2r: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        d, m = self.w1.shape[1], self.b2.shape[0]
        if self.role == "mlp":  # per hidden neuron: its fc1 row(s) and fc2 column
            self.unit_flops = 2 * d * (2 if self.wg is not None else 1) + 2 * m
            self.dense_flops_per_row = self.w1.shape[0] * self.unit_flops
        else:  # per factor component: a row of A and a column of B; the dense layer is m x d
            self.unit_flops = 2 * (d + m)
            self.dense_flops_per_row = 2 * d * m

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        up = torch.addmm(self.b1, x, self.w1.t())
        if self.wg is None:
            return activate(up, self.activation)
        return activate(torch.addmm(self.bg, x, self.wg.t()), self.activation) * up


def _dense(p: Projection, where: str) -> Projection:
    """``p``, refused when low_rank factorised it: acm's learners would put the dense weight back."""
    if p.factors:
        raise ACMError(f"acm: {where} is factorised (low_rank ran on it); converting it would undo the "
                       "factorisation: run acm before low_rank, or low_rank on the roles acm does not convert")
    return p


def bias(p: Projection, size: int, dtype) -> torch.Tensor:
    return p.bias.const if p.bias is not None else torch.zeros(size, dtype=dtype)


def find_modules(graph: Graph, roles: list[str], blocks: list[int] | None) -> list[Module]:
    """The modules of the selected roles in the selected blocks, with clear errors for what is missing."""
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ACMError(f"acm: unknown module role(s) {bad}; choose from {list(ROLES)}")
    if graph.find_nodes("int.linear") or graph.find_nodes("int.matmul"):
        raise ACMError("acm does not apply to an integer-only graph (integer_only ran): its learners would need "
                       "integer GEMMs over groups of tokens with a requantisation per learner and the gate an "
                       "integer argmax, and there is no such kernel; run acm on the float model and leave it float")
    try:
        structure = analyze(graph)
    except StructureError as e:
        raise ACMError(f"acm needs transformer MLPs (fc1 -> activation -> fc2 with a residual add) and found none: "
                       f"{e}") from None
    if not structure.blocks:
        raise ACMError("acm found no transformer block with an MLP")
    chosen = structure.blocks if blocks is None else [b for b in structure.blocks if b.index in set(blocks)]
    missing = set(blocks or []) - {b.index for b in structure.blocks}
    if missing:
        raise ACMError(f"acm: block(s) {sorted(missing)} do not exist; the graph has blocks 0..{len(structure.blocks) - 1}")
    modules: list[Module] = []
    for b in chosen:
        if "mlp" in roles:
            if b.mlp.fc1.nodes[0].op == "acm":
                raise ACMError(f"acm: block {b.index}'s MLP is already an ACM (acm ran before)")
            modules.append(_mlp_module(b.index, b.mlp))
        seen = set()
        for role in ("q", "k", "v", "out"):
            if role in roles:
                p = getattr(b.attention, role)
                if id(p.weight) in seen:  # a fused qkv projection is one module
                    continue
                seen.add(id(p.weight))
                w = _dense(p, f"block {b.index} {role}").matrix
                dt = w.dtype
                modules.append(Module(f"block {b.index} {role}", b.index, role,
                                      p.input, p.output, w.float(), torch.zeros(0), torch.zeros(0),
                                      bias(p, w.shape[0], dt).float(), "none", dtype=dt, min_k=1))
    return modules


def _mlp_module(index: int, mlp: MLP) -> Module:
    where = f"block {index} MLP"
    acts = [a for a in mlp.activation if a not in ("mul",)] if mlp.gate is not None else list(mlp.activation)
    if mlp.convs:
        raise ACMError(f"acm: {where} has a conv2d between fc1 and fc2 (Mix-FFN); its hidden neurons are not "
                       "independent per token, so it cannot be split into learners")
    if mlp.fc2.input.producer is mlp.fc1.nodes[-1] and not acts:
        raise ACMError(f"acm: {where}: fc1 feeds fc2 directly with no activation: it looks factorised (low_rank ran "
                       "on the MLP). Run low_rank on the attention only (roles=attention) or after acm")
    if len(acts) != 1 or acts[0] not in ACTIVATIONS:
        raise ACMError(f"acm: {where} has an unsupported activation {acts or 'none'} between fc1 and fc2; acm "
                       f"supports one of {[a for a in ACTIVATIONS if a != 'none']} (written-out GELUs are folded "
                       "first), optionally gated (SwiGLU/GeGLU)")
    act = acts[0]
    if act == "gelu":
        gelu = next(n for n in _between(mlp) if n.op == "gelu")
        act = "gelu" if gelu.attrs["approximate"] == "none" else "gelu_tanh"
    w1, w2 = _dense(mlp.fc1, f"{where} fc1").matrix, _dense(mlp.fc2, f"{where} fc2").matrix
    dt = w1.dtype
    wg = _dense(mlp.gate, f"{where} gate").matrix.float() if mlp.gate is not None else None
    bg = bias(mlp.gate, w1.shape[0], dt).float() if mlp.gate is not None else None
    if mlp.gate is not None and mlp.gate.input is not mlp.fc1.input:
        raise ACMError(f"acm: {where}: the gate and up projections read different values")
    return Module(where, index, "mlp", mlp.fc1.input, mlp.fc2.output, w1.float(), bias(mlp.fc1, w1.shape[0], dt).float(),
                  w2.float(), bias(mlp.fc2, w2.shape[0], dt).float(), act, wg, bg, dt, 0)


def _between(mlp: MLP):
    from graphopt.ir.traversal import descendants
    stop = {id(n) for n in mlp.fc2.nodes}
    return [n for n in descendants(mlp.fc1.output, through=lambda n: id(n) not in stop, limit=32) if id(n) not in stop]


def split_points(width: int, n: int, split: list[float] | None) -> tuple[int, ...]:
    """N + 1 boundaries: equal widths, or the given fractions (normalised) rounded to whole neurons."""
    fractions = [1.0 / n] * n if not split else [float(f) for f in split]
    if len(fractions) != n or any(f <= 0 for f in fractions):
        raise ACMError(f"acm: split {split} must give {n} positive fractions (one per learner)")
    total = sum(fractions)
    cuts = [0]
    acc = 0.0
    for f in fractions[:-1]:
        acc += f / total
        cuts.append(min(width - (n - len(cuts)), max(cuts[-1] + 1, round(acc * width))))
    cuts.append(width)
    if width < n:
        raise ACMError(f"acm: a width of {width} cannot be split into {n} learners")
    return tuple(cuts)


def build_learners(m: Module, x: torch.Tensor, n: int, split: list[float] | None, spare: bool = False) -> None:
    """Order the module's units by calibration score and cut them into ``n`` learners (in place). With
    ``spare`` each learner but the last holds one unit fewer, leaving room for ``compensate``'s constant
    neuron, so the learners' widths stay as split (GEMM-friendly) and the last takes the N - 1 units over."""
    if m.role == "mlp":
        score = m.hidden(x).std(0) * m.w2.norm(dim=0)
        order = torch.argsort(score, descending=True, stable=True)
        m.w1, m.b1, m.w2 = m.w1[order].contiguous(), m.b1[order].contiguous(), m.w2[:, order].contiguous()
        if m.wg is not None:
            m.wg, m.bg = m.wg[order].contiguous(), m.bg[order].contiguous()
    else:
        x64 = x.double()
        d = whitened_svd(m.w1.double(), x64.t() @ x64 / max(1, x.shape[0]))
        a, b = d.factors(d.s.numel(), torch.float32)
        w = m.w1
        m.w1, m.b1, m.w2 = a, torch.zeros(a.shape[0]), b
        if d.fallback:
            m.notes.append(d.fallback)
        err = float((b.double() @ a.double() - w.double()).abs().max())
        m.notes.append(f"full-rank factors reproduce the weight to {err:.1e}")
    cuts = split_points(m.w1.shape[0], n, split)
    if spare and n > 1:
        if min(b - a for a, b in zip(cuts[:-2], cuts[1:-1])) < 2:
            raise ACMError(f"acm: {m.name}: learners of width {list(zip(cuts[:-1], cuts[1:]))} leave no room for "
                           "the compensation neuron; use fewer learners or compensation=False")
        cuts = tuple(c - min(i, n - 1) for i, c in enumerate(cuts[:-1])) + (cuts[-1],)
    m.splits = cuts


def _hidden(m: Module, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    up = torch.addmm(m.b1[lo:hi], x, m.w1[lo:hi].t())
    if m.wg is not None:
        return activate(torch.addmm(m.bg[lo:hi], x, m.wg[lo:hi].t()), m.activation) * up
    return activate(up, m.activation)


def contributions(m: Module, x: torch.Tensor, *w2s: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per output weight set (default the module's own): each learner's output on the rows of ``x``
    (learner 0 with the output bias); each learner's hidden activations are computed once."""
    w2s = w2s or (m.w2,)
    out: list[list[torch.Tensor]] = [[] for _ in w2s]
    for i, (lo, hi) in enumerate(zip(m.splits[:-1], m.splits[1:])):
        h = _hidden(m, x, lo, hi)
        for parts, w2 in zip(out, w2s):
            c = h @ w2[:, lo:hi].t()
            parts.append(c + m.b2 if i == 0 else c)
    return out


def refit(m: Module, x: torch.Tensor, ridge: float) -> None:
    """Stagewise closed-form refit of the output weights for truncated prefixes (``w2r``)."""
    target = sum(contributions(m, x)[0])
    w2r = m.w2.clone()
    done = torch.zeros_like(target)
    n = len(m.splits) - 1
    for i, (lo, hi) in enumerate(zip(m.splits[:-1], m.splits[1:])):
        if i == n - 1:
            break  # the last learner runs only for k = N, which keeps the original weights
        h = _hidden(m, x, lo, hi)
        rest = target - done - (m.b2 if i == 0 else 0)
        g = (h.t() @ h).double()
        lam = ridge * float(torch.diagonal(g).mean().clamp_min(1e-12))
        w = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=torch.float64),
                               (h.t() @ rest).double() + lam * m.w2[:, lo:hi].t().double()).t().float()
        w2r[:, lo:hi] = w
        done = done + h @ w.t() + (m.b2 if i == 0 else 0)
    m.w2r = w2r


def compensate(m: Module, x: torch.Tensor) -> None:
    """Append one constant neuron to each learner but the last, whose ``w2r`` column adds the calibration
    mean of what each truncated prefix misses (``w2`` columns zero); k = 0 stays zero (in place)."""
    n = len(m.splits) - 1
    if n < 2:
        return
    exact, approx = contributions(m, x, m.w2, m.w2r if m.w2r is not None else m.w2)
    missing, acc, biases = sum(exact), 0, []
    for c in approx[:-1]:
        acc = acc + c
        biases.append((missing - acc).mean(0))
    steps = [biases[0]] + [b - a for a, b in zip(biases, biases[1:])]  # learner i adds bias_(i+1) - bias_i
    d, out = m.w1.shape[1], m.b2.shape[0]
    unit = activate(torch.ones(1), m.activation)  # the constant neuron's activation (gated: act(1) * 1)
    parts = {"w1": [], "b1": [], "w2": [], "w2r": [], "wg": [], "bg": []}
    w2r = m.w2r if m.w2r is not None else m.w2
    cuts = [0]
    for i, (lo, hi) in enumerate(zip(m.splits[:-1], m.splits[1:])):
        parts["w1"].append(m.w1[lo:hi]); parts["b1"].append(m.b1[lo:hi])  # noqa: E702
        parts["w2"].append(m.w2[:, lo:hi]); parts["w2r"].append(w2r[:, lo:hi])  # noqa: E702
        if m.wg is not None:
            parts["wg"].append(m.wg[lo:hi]); parts["bg"].append(m.bg[lo:hi])  # noqa: E702
        if i < n - 1:
            parts["w1"].append(torch.zeros(1, d)); parts["b1"].append(torch.ones(1))  # noqa: E702
            parts["w2"].append(torch.zeros(out, 1)); parts["w2r"].append((steps[i] / unit).reshape(out, 1))  # noqa: E702
            if m.wg is not None:
                parts["wg"].append(torch.zeros(1, d)); parts["bg"].append(torch.ones(1))  # noqa: E702
        cuts.append(cuts[-1] + hi - lo + (i < n - 1))
    m.w1, m.b1 = torch.cat(parts["w1"]).contiguous(), torch.cat(parts["b1"]).contiguous()
    m.w2, m.w2r = torch.cat(parts["w2"], 1).contiguous(), torch.cat(parts["w2r"], 1).contiguous()
    if m.wg is not None:
        m.wg, m.bg = torch.cat(parts["wg"]).contiguous(), torch.cat(parts["bg"]).contiguous()
    m.splits = tuple(cuts)
    m.dense_flops_per_row = cuts[-1] * m.unit_flops


def prefix_errors(m: Module, x: torch.Tensor) -> torch.Tensor:
    """[rows, N + 1]: ||prefix_k(x) - module(x)|| per row for k = 0..N (with the refitted weights below N)."""
    exact, approx = contributions(m, x, m.w2, m.w2r if m.w2r is not None else m.w2)
    target = sum(exact)
    errs = [target.norm(dim=-1)]
    acc = torch.zeros_like(target)
    for c in approx[:-1]:
        acc = acc + c
        errs.append((acc - target).norm(dim=-1))
    errs.append(torch.zeros(x.shape[0]))
    return torch.stack(errs, 1)
