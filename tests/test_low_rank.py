"""low_rank: factorisation maths (against independent SVDs), the rewrite, rank rules, allocation,
sequential calibration, structure roles, and clear errors for bad options."""
import itertools
import math

import pytest
import torch

import graphopt
from graphopt.backends.torch_backend import run
from graphopt.frontends import from_torch
from graphopt.ir import Graph, TensorType, verify
from graphopt.passes import PassConfigError, PassError, PassManager
from graphopt.passes.low_rank_calib import Option, allocate
from graphopt.passes.low_rank_factor import plain_svd, rank_for_ratio, whitened_svd
from graphopt.passes.low_rank_layers import find_layers, rewrite

F32 = torch.float32


pytestmark = pytest.mark.usefixtures("one_thread")


def run_low_rank(graph, calibration=None, **options):
    out, report = PassManager([("low_rank", options)], calibration=calibration).run(graph)
    verify(out)
    return out, report["low_rank"]


def mlp_graph(n=24, h=48, m=16, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(n, h), torch.nn.GELU(), torch.nn.Linear(h, m)).eval()
    return model, from_torch(model, (torch.randn(2, 5, n),))


# ---- the maths ----------------------------------------------------------------------------------
def test_full_rank_reproduces_the_weight_plain_and_whitened():
    torch.manual_seed(0)
    w = torch.randn(12, 8)
    x = torch.randn(50, 8)
    for d in (plain_svd(w), whitened_svd(w, x.t() @ x)):
        a, b = d.factors(8)
        assert a.shape == (8, 8) and b.shape == (12, 8)
        torch.testing.assert_close(b @ a, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_plain_svd_error_is_the_dropped_singular_values(rank):
    torch.manual_seed(1)
    w = torch.randn(20, 9, dtype=torch.float64)
    sigma = torch.linalg.svdvals(w)                     # independent reference
    a, b = plain_svd(w).factors(rank, torch.float64)
    err = w - b @ a
    assert torch.linalg.matrix_norm(err).item() ** 2 == pytest.approx(float((sigma[rank:] ** 2).sum()), rel=1e-9)
    assert torch.linalg.matrix_norm(err, ord=2).item() == pytest.approx(float(sigma[rank]), rel=1e-9)


@pytest.mark.parametrize("rank", [2, 5])
def test_whitened_svd_output_error_is_optimal_for_the_data(rank):
    """Eckart-Young on Y = X Wᵀ: no rank-r weight does better on X than the dropped singular values of Y."""
    torch.manual_seed(2)
    x = torch.randn(200, 10, dtype=torch.float64) * torch.linspace(0.1, 5.0, 10, dtype=torch.float64)
    w = torch.randn(7, 10, dtype=torch.float64)
    y = x @ w.t()
    sigma = torch.linalg.svdvals(y)
    a, b = whitened_svd(w, x.t() @ x).factors(rank, torch.float64)
    out_err = torch.linalg.matrix_norm(y - x @ (b @ a).t()).item() ** 2
    assert out_err == pytest.approx(float((sigma[rank:] ** 2).sum()), rel=1e-7)
    pa, pb = plain_svd(w).factors(rank, torch.float64)
    assert out_err < torch.linalg.matrix_norm(y - x @ (pb @ pa).t()).item() ** 2


def test_whitening_falls_back_when_the_cholesky_fails():
    torch.manual_seed(3)
    x = torch.randn(4, 12, dtype=torch.float64)          # 4 tokens, 12 features: rank-4 Gram
    x[:, 5] = 0.0                                        # and a dead channel
    w = torch.randn(6, 12, dtype=torch.float64)
    d = whitened_svd(w, x.t() @ x)
    assert d.fallback, "a singular Gram must be reported"
    a, b = d.factors(3, torch.float64)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # still near-optimal on the calibration data: the data has rank 4, so rank 4 reproduces it
    a4, b4 = d.factors(4, torch.float64)
    torch.testing.assert_close(x @ (b4 @ a4).t(), x @ w.t(), atol=1e-4, rtol=1e-4)


def test_energy_rank_is_the_smallest_keeping_that_energy():
    torch.manual_seed(4)
    w = torch.randn(16, 16, dtype=torch.float64)
    s2 = torch.linalg.svdvals(w) ** 2
    d = plain_svd(w)
    for energy in (0.5, 0.9, 0.99):
        r = d.rank_for_energy(energy)
        assert s2[:r].sum() / s2.sum() >= energy - 1e-12
        assert r == 1 or s2[:r - 1].sum() / s2.sum() < energy


# ---- the rewrite, for every layer kind ------------------------------------------------------------
def _graph_with(kind, w, bias=None):
    g = Graph()
    if kind == "conv1x1":
        x = g.add_input("x", TensorType(F32, ("batch", w.shape[1], 5, 5)))
        out = g.op.conv2d(x, g.add_constant(w.reshape(*w.shape, 1, 1)), g.add_constant(bias), stride=(2, 2), padding=(1, 1))
    elif kind == "matmul":
        x = g.add_input("x", TensorType(F32, ("batch", 7, w.shape[1])))
        out = g.op.add(g.op.matmul(x, g.add_constant(w.t().contiguous())), g.add_constant(bias))
    else:
        x = g.add_input("x", TensorType(F32, ("batch", 7, w.shape[1])))
        out = g.op.linear(x, g.add_constant(w), g.add_constant(bias))
    g.set_outputs([out])
    return g


@pytest.mark.parametrize("kind", ["linear", "matmul", "conv1x1"])
def test_rewrite_with_full_rank_factors_is_exact(kind):
    torch.manual_seed(5)
    w, bias = torch.randn(10, 6), torch.randn(10)
    g = _graph_with(kind, w, bias)
    x = torch.randn(3, 6, 5, 5) if kind == "conv1x1" else torch.randn(3, 7, 6)
    before = run(g, x)[0]
    (layer,) = find_layers(g)
    assert layer.kind == kind and layer.shape == (10, 6)
    a, b = plain_svd(layer.matrix).factors(6)
    rewrite(g, layer, a, b)
    verify(g)
    assert len(find_layers(g)) == 2
    torch.testing.assert_close(run(g, x)[0], before, atol=1e-5, rtol=1e-5)


def test_uniform_ratio_ranks_and_report():
    model, g = mlp_graph()
    out, rec = run_low_rank(g, method="svd", ratio=0.5)
    layers = find_layers(out)
    ranks = sorted(l.shape for l in layers)
    r1, r2 = rank_for_ratio(48, 24, 0.5), rank_for_ratio(16, 48, 0.5)
    assert r1 == math.floor(0.5 * 48 * 24 / 72) and r2 == math.floor(0.5 * 16 * 48 / 64)
    assert sorted([(r1, 24), (48, r1), (r2, 48), (16, r2)]) == ranks
    assert rec.counters["factorised"] == 2
    assert any("kept parameters" in n for n in rec.notes)


def test_layers_that_would_not_get_cheaper_are_left_and_listed():
    torch.manual_seed(6)
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", 8)))
    h = g.op.linear(x, g.add_constant(torch.randn(8, 8), "square"))   # break-even rank 4
    g.set_outputs([g.op.linear(h, g.add_constant(torch.randn(32, 8), "wide"))])
    out, rec = run_low_rank(g, method="svd", ratio=1.0)                 # square: r = 4 = mn/(m+n)
    assert rec.counters["left_dense_no_saving"] == 1 and rec.counters["factorised"] == 1
    assert any("square" in n and "left dense" in n for n in rec.notes)
    assert [n.inputs[1].name for n in out.nodes][0] == "square"


def test_explicit_rank_map_only_touches_named_layers():
    _, g = mlp_graph()
    out, rec = run_low_rank(g, method="svd", ranks={"0": 3})
    shapes = sorted(l.shape for l in find_layers(out))
    assert shapes == sorted([(3, 24), (48, 3), (16, 48)])


# ---- bad options --------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, -0.2, 1.5])
def test_ratio_outside_unit_interval_is_a_clear_error(ratio):
    _, g = mlp_graph()
    with pytest.raises(PassError, match=rf"ratio={ratio}.*must be in \(0, 1\]"):
        run_low_rank(g, method="svd", ratio=ratio)


def test_unknown_layer_pattern_names_the_pattern_and_the_layers():
    _, g = mlp_graph()
    with pytest.raises(PassError, match=r"layer pattern 'decoder\.\*' matches no layer; the layers are: 0, 2"):
        run_low_rank(g, method="svd", layers=["decoder.*"])
    with pytest.raises(PassError, match=r"unknown role 'ffn'"):
        run_low_rank(g, method="svd", roles=["ffn"])
    with pytest.raises(PassError, match=r"ranks: rank for '0' must be a positive integer"):
        run_low_rank(g, method="svd", ranks={"0": 2.5})


@pytest.mark.parametrize("rewrite", ["low_rank:method=svd", "sparsify:criterion=magnitude"])
def test_an_integer_only_graph_is_refused_with_the_order_to_use(rewrite):
    # "the layer selection (layers/roles/exclude) leaves no layer to factorise" once answered a user who gave none
    model, g = mlp_graph()
    calib = [(torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    integer = graphopt.optimize(g, ["integer_only"], calibration=calib, progress=False).graph
    with pytest.raises(PassError, match=r"no float linear.*run this pass before integer_only"):
        PassManager([rewrite]).run(integer)


def test_activation_aware_needs_calibration():
    _, g = mlp_graph()
    with pytest.raises(PassError, match="needs calibration data"):
        run_low_rank(g, method="svd_llm")


def test_string_options_parse():
    _, g = mlp_graph()
    out, _ = PassManager(["low_rank:method=svd,ratio=0.25,layers=0"]).run(g)
    assert sorted(l.shape for l in find_layers(out)) == sorted([(rank_for_ratio(48, 24, 0.25), 24),
                                                               (48, rank_for_ratio(48, 24, 0.25)), (16, 48)])


# ---- allocation ---------------------------------------------------------------------------------
def test_allocation_matches_brute_force_and_respects_budget():
    import random
    rng = random.Random(0)
    for trial in range(20):
        table = []
        for _ in range(4):
            mn = rng.choice([64, 100, 144])
            opts = [Option(None, mn, 0.0)]
            s = 0.0
            for p in sorted(rng.sample(range(5, mn), 3), reverse=True):
                s += rng.random()
                opts.append(Option(p, p, s))
            table.append(opts)
        budget = rng.uniform(0.3, 0.8) * sum(o[0].params for o in table)
        choice, reached = allocate(table, budget)
        best = min((sum(o.sensitivity for o in c) for c in itertools.product(*table)
                    if sum(o.params for o in c) <= budget), default=None)
        assert reached and sum(o.params for o in choice) <= budget
        got = sum(o.sensitivity for o in choice)
        assert got <= best * 1.5 + 1e-9, (trial, got, best)  # Lagrangian + greedy: near the optimum


def _chain(seed=0):
    """y = L2(L1 x): L1 is nearly rank 3 (cheap to compress), L2 has a flat spectrum (expensive)."""
    torch.manual_seed(seed)
    l1 = torch.nn.Linear(32, 32, bias=False)
    l2 = torch.nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        l1.weight.copy_(torch.randn(32, 3) @ torch.randn(3, 32) / 3 + 0.01 * torch.randn(32, 32))
        q, _ = torch.linalg.qr(torch.randn(32, 32))
        l2.weight.copy_(q)
    model = torch.nn.Sequential(l1, l2).eval()
    x = torch.randn(4, 16, 32)
    return model, from_torch(model, (x,)), [(torch.randn(4, 16, 32),) for _ in range(4)]


class _Branches(torch.nn.Module):
    """y = L1 x + L2 x + L3 x: L1, L2 nearly rank 3 (cheap to compress), L3 orthogonal (flat spectrum)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = (torch.nn.Linear(32, 32, bias=False) for _ in range(3))
        with torch.no_grad():
            for lin in (self.l1, self.l2):
                lin.weight.copy_(torch.randn(32, 3) @ torch.randn(3, 32) / 3 + 0.01 * torch.randn(32, 32))
            self.l3.weight.copy_(torch.linalg.qr(torch.randn(32, 32))[0])

    def forward(self, x):
        return self.l1(x) + self.l2(x) + self.l3(x)


def _rel_err(graph, model, batches):
    num = den = 0.0
    for (x,) in batches:
        with torch.no_grad():
            ref = model(x)
        num += float(((run(graph, x)[0] - ref) ** 2).sum())
        den += float((ref ** 2).sum())
    return num / den


def test_sensitivity_allocation_beats_uniform_at_the_same_budget():
    torch.manual_seed(0)
    model = _Branches().eval()
    g = from_torch(model, (torch.randn(4, 16, 32),))
    calib = [(torch.randn(4, 16, 32),) for _ in range(4)]
    held_out = [(torch.randn(4, 16, 32),) for _ in range(3)]
    uni, _ = run_low_rank(g, calib, method="svd_llm", ratio=0.5)
    alloc, rec = run_low_rank(g, calib, method="svd_llm", ratio=0.5, allocation="sensitivity")
    assert alloc.meta["low_rank_kept_fraction"] <= 0.5 + 1e-9
    assert uni.meta["low_rank_kept_fraction"] == pytest.approx(alloc.meta["low_rank_kept_fraction"], abs=0.08)
    e_uni, e_alloc = _rel_err(uni, model, held_out), _rel_err(alloc, model, held_out)
    assert e_alloc < 0.2 * e_uni, (e_alloc, e_uni)
    assert any("l3" in n and "kept dense by the allocation" in n for n in rec.notes)
    assert rec.counters["sensitivity_trials"] > 0


def test_sequential_correction_is_no_worse_on_the_calibration_set():
    model, g, calib = _chain(1)
    plain, _ = run_low_rank(g, calib, method="svd_llm", ratio=0.3)
    seq, _ = run_low_rank(g, calib, method="svd_llm", ratio=0.3, sequential=True, correct=True, ridge=1e-9)
    assert _rel_err(seq, model, calib) <= _rel_err(plain, model, calib) * (1 + 1e-6)


def test_correction_refits_a_layer_kept_dense_to_the_dense_output():
    """y = L2 relu(L1 x): L2 is kept dense (rank 32 saves nothing); with correct=true its weight becomes
    the least-squares fit of the dense output on the factorised L1's (rectified) output."""
    dense_chain, _, calib = _chain(1)
    model = torch.nn.Sequential(dense_chain[0], torch.nn.ReLU(), dense_chain[1]).eval()
    g = from_torch(model, (calib[0][0],))
    out, rec = run_low_rank(g, calib, method="svd_llm", ranks={"0": 4, "2": 32}, sequential=True, correct=True,
                            ridge=1e-9, holdout=0)
    assert rec.counters["refitted_dense"] == 1 and rec.counters["factorised"] == 1
    part = {n.meta["low_rank_part"]: n.inputs[1].const.double() for n in out.nodes if "low_rank" in n.meta}
    x = torch.cat([b[0].reshape(-1, 32) for b in calib]).double()
    compressed = torch.relu(x @ part["a"].t() @ part["b"].t())    # the factorised L1's output, rectified
    with torch.no_grad():
        target = model(x.float()).double()
    w_star = torch.linalg.lstsq(compressed, target, driver="gelsd").solution    # minimum-norm least squares
    got = torch.cat([run(out, b[0])[0].reshape(-1, 32) for b in calib]).double()
    torch.testing.assert_close(got, compressed @ w_star, atol=1e-4, rtol=1e-4)
    unrefitted = compressed @ model[2].weight.detach().double().t()
    assert ((got - target) ** 2).sum() < 0.9 * ((unrefitted - target) ** 2).sum()


def test_poor_compression_is_said_plainly():
    model, g, calib = _chain(2)
    _, rec = run_low_rank(g, calib, method="svd_llm", ratio=0.1, layers=["1"])
    assert any("does not compress well" in n for n in rec.notes)


def _cosine(graph, model, batches):
    """Mean cosine of output rows, graph against the torch model, over ``batches``."""
    cos = []
    with torch.no_grad():
        for (x,) in batches:
            got, ref = run(graph, x)[0], model(x)
            cos.append(torch.nn.functional.cosine_similarity(got.double().reshape(-1, 32),
                                                             ref.double().reshape(-1, 32), dim=-1))
    return float(torch.cat(cos).mean())


def test_quality_estimate_is_measured_on_held_out_batches():
    """Each calibration batch lives in its own 6-dim subspace: whitening fits the fitting batches' subspaces,
    so the cosine on them is optimistic, and only a held-out batch shows the real quality."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32, bias=False)).eval()
    g = from_torch(model, (torch.randn(4, 16, 32),))
    calib = [(torch.randn(4, 16, 6) @ torch.randn(6, 32),) for _ in range(5)]
    out, rec = run_low_rank(g, calib, method="svd_llm", ratio=0.75, holdout=0.2)
    held, fitting = calib[2:3], calib[:2] + calib[3:]   # one of five held out: the middle one
    assert out.meta["low_rank_cosine_held_out"]
    assert out.meta["low_rank_output_cosine"] == pytest.approx(_cosine(out, model, held), abs=1e-6)
    assert _cosine(out, model, held) < _cosine(out, model, fitting) - 0.05
    assert any("1 held-out calibration batches" in n for n in rec.notes)
    naive, rec = run_low_rank(g, calib, method="svd_llm", ratio=0.75, holdout=0)
    assert not naive.meta["low_rank_cosine_held_out"]
    assert naive.meta["low_rank_output_cosine"] == pytest.approx(_cosine(naive, model, calib), abs=1e-6)
    assert any("optimistic" in n for n in rec.notes)


@pytest.mark.parametrize("holdout", [-0.1, 1.0])
def test_holdout_outside_its_interval_is_a_clear_error(holdout):
    g = mlp_graph()[1]
    with pytest.raises(PassError, match=r"holdout=.* must be in \[0, 1\)"):
        run_low_rank(g, [(torch.randn(2, 5, 24),)] * 2, holdout=holdout)


# ---- structure roles on a tiny BERT ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=16)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 8))
    return model, from_torch(model, (ids,)), ids


def test_select_by_structure_role(tiny_bert):
    model, g, ids = tiny_bert
    roles = {l.name: l.role for l in find_layers(g)}
    assert roles["encoder.layer.0.attention.self.query"] == "q"
    assert roles["encoder.layer.1.intermediate.dense"] == "fc1" and roles["encoder.layer.1.output.dense"] == "fc2"
    out, rec = run_low_rank(g, method="svd", ratio=0.5, roles=["mlp"])
    assert rec.counters["factorised"] == 4
    touched = {n.meta["low_rank"]["layer"] for n in out.nodes if "low_rank" in n.meta}
    assert touched == {f"encoder.layer.{i}.{p}.dense" for i in (0, 1) for p in ("intermediate", "output")}
    out, rec = run_low_rank(g, method="svd", ratio=0.5, roles=["attention"], exclude=["*.key"])
    assert rec.counters["factorised"] == 6


# ---- the digits-trained ViT -----------------------------------------------------------------------
def test_digits_vit_loses_at_most_one_point_at_half_the_linear_parameters(digits_case):
    """SVD-LLM with sensitivity allocation, sequential calibration and correction, calibrated on 512
    training images only; the sensitivities are cached next to the trained model (re-measured when
    the model or the calibration changes), so only the first run pays for the search."""
    from graphopt import zoo
    case = digits_case
    g = from_torch(case.model, (), case.kwargs)
    calib = [(case.train_images[i:i + 64],) for i in range(0, 512, 64)]
    out, rec = run_low_rank(g, calib, method="svd_llm", ratio=0.5, allocation="sensitivity", sequential=True,
                            correct=True, sensitivity_batches=4,
                            sensitivity_file=str(zoo.cache_dir() / "digits_vit-low_rank-sensitivity.json"))
    assert out.meta["low_rank_kept_fraction"] <= 0.5 and rec.counters["factorised"] > 0
    dense = case.accuracy(case.model)
    assert case.accuracy(lambda x: run(out, x)[0]) >= dense - 0.01
