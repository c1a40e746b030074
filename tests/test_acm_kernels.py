"""The acm op: the masked reference against the dense MLP, and the grouped kernels (CPU, Triton under
TRITON_INTERPRET=1, ONNX Runtime) against the reference on random, all-zero, all-N and one-row k."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch
import torch.nn.functional as F

from graphopt.backends.acm_cpu import grouped_acm
from graphopt.ir import Graph, TensorType, verify
from graphopt.ir.ops.acm import acm, gate_choice

D, H, M, N = 24, 40, 20, 4
SPLITS = (0, 12, 20, 32, 40)  # unequal learners, ragged against every block size


def weights(seed=0, gated=False, refit=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype) / 4  # noqa: E731
    w = {"w1": r(H, D), "b1": r(H), "w2": r(M, H), "b2": r(M)}
    w["wg"], w["bg"] = (r(H, D), r(H)) if gated else (None, None)
    w["w2r"] = r(M, H) if refit else None
    return w


def dense_mlp(x, w, act):
    """The module the learners were cut from, written independently of the op."""
    f = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}[act]
    hidden = f(x @ w["wg"].T + w["bg"]) * (x @ w["w1"].T + w["b1"]) if w["wg"] is not None else f(x @ w["w1"].T + w["b1"])
    return hidden @ w["w2"].T + w["b2"]


def run_op(fn, x, k, w, act="gelu"):
    return fn(x, k, w["w1"], w["b1"], w["w2"], w["b2"], w["wg"], w["bg"], w["w2r"], splits=SPLITS, activation=act,
              fractions=())


K_CASES = {
    "random": lambda shape, g: torch.randint(0, N + 1, shape, generator=g),
    "all zero": lambda shape, g: torch.zeros(shape, dtype=torch.long),
    "all N": lambda shape, g: torch.full(shape, N),
}


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_reference_at_k_n_is_the_dense_mlp_and_at_k_0_is_zero(gated, act):
    w = weights(1, gated, refit=True)  # rows with k = N never use the refitted weights
    x = torch.randn(3, 5, D, dtype=torch.float64)
    full = run_op(acm, x, torch.full((3, 5), N), w, act)
    torch.testing.assert_close(full, dense_mlp(x, w, act), atol=1e-12, rtol=1e-12)
    assert run_op(acm, x, torch.zeros(3, 5, dtype=torch.long), w, act).abs().max() == 0


def test_reference_prefix_is_the_sum_of_hidden_slices():
    """k = 2 with no refit: the first 20 hidden neurons of the MLP, computed by hand."""
    w = weights(2)
    x = torch.randn(7, D, dtype=torch.float64)
    hidden = F.gelu(x @ w["w1"][:20].T + w["b1"][:20])
    expected = hidden @ w["w2"][:, :20].T + w["b2"]
    torch.testing.assert_close(run_op(acm, x, torch.full((7,), 2), w), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("case", list(K_CASES))
@pytest.mark.parametrize("variant", ["plain", "gated", "refit"])
@pytest.mark.parametrize("rows", [1, 37])
def test_grouped_cpu_kernel_matches_the_reference(case, variant, rows):
    g = torch.Generator().manual_seed(rows)
    w = weights(3, gated=variant == "gated", refit=variant == "refit", dtype=torch.float32)
    x = torch.randn(rows, 2, D, generator=g) if rows > 1 else torch.randn(1, D, generator=g)
    k = K_CASES[case](x.shape[:-1], g)
    torch.testing.assert_close(run_op(grouped_acm, x, k, w), run_op(acm, x, k, w), atol=2e-6, rtol=1e-5)


def test_triton_kernel_matches_the_reference_under_the_interpreter(triton_interpreter):
    from graphopt.backends.triton_acm import triton_acm
    g = torch.Generator().manual_seed(5)
    for case, variant, rows in [("random", "refit", 37), ("random", "gated", 19), ("all zero", "plain", 19),
                                ("all N", "plain", 1)]:
        w = weights(4, gated=variant == "gated", refit=variant == "refit", dtype=torch.float32)
        x = torch.randn(rows, D, generator=g)
        k = K_CASES[case]((rows,), g)
        torch.testing.assert_close(run_op(triton_acm, x, k, w), run_op(acm, x, k, w), atol=1e-5, rtol=1e-5,
                                   msg=f"{case} {variant} {rows}")


def acm_graph(w, gate_w, gate_b, min_k=0, tokens=9):
    """x -> acm_gate -> acm, with a symbolic batch."""
    import sympy
    g = Graph("acm")
    batch = sympy.Symbol("batch", integer=True, positive=True)
    x = g.add_input("x", TensorType(torch.float32, (batch, tokens, D)))
    c = {name: g.add_constant(t.float(), name) for name, t in w.items() if t is not None}
    k = g.create_node("acm_gate", [x, g.add_constant(gate_w, "gw"), g.add_constant(gate_b, "gb")], {"min_k": min_k})
    inputs = [x, k.output, c["w1"], c["b1"], c["w2"], c["b2"], c.get("wg"), c.get("bg"), c.get("w2r")]
    while inputs[-1] is None:
        inputs.pop()
    y = g.create_node("acm", inputs, {"splits": SPLITS, "activation": "gelu", "fractions": (1.0, 0.5, 0.5, 0.25)})
    g.set_outputs([y.output, k.output])
    verify(g)
    return g


@pytest.mark.parametrize("variant", ["plain", "gated", "refit"])
def test_onnx_runtime_runs_the_lowered_acm_with_data_dependent_sizes(variant):
    pytest.importorskip("onnxruntime")
    from graphopt.backends.registry import lower
    from graphopt.backends.torch_backend import run
    w = weights(6, gated=variant == "gated", refit=variant == "refit", dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    gate_w = torch.randn(N + 1, D, generator=gen) * 3  # well separated logits: no ties between runtimes
    for name, bias, min_k in [("random", torch.zeros(N + 1), 0), ("all zero", torch.tensor([1e4, 0, 0, 0, 0.]), 0),
                              ("all N", torch.tensor([0, 0, 0, 0, 1e4]), 0), ("min_k 1", torch.zeros(N + 1), 1)]:
        graph = acm_graph(w, gate_w, bias, min_k)
        ort = lower(graph, "onnxruntime", threads=1)
        for batch in (1, 3):
            x = torch.randn(batch, 9, D, generator=gen)
            y_ref, k_ref = run(graph, x)
            y, k = ort.run_flat(x)
            assert torch.equal(k, k_ref), name
            assert (name != "all zero" or k.max() == 0) and (name != "all N" or k.min() == N)
            assert k.min() >= min_k
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5, msg=f"{name} batch {batch}")
    x1 = torch.randn(1, 9, D)
    torch.testing.assert_close(run(graph, x1)[0], run_op(acm, x1, gate_choice(x1, gate_w, torch.zeros(N + 1), 1), w),
                               atol=1e-6, rtol=1e-5)  # the graph runs the op on the gate's k


def test_gate_labels_follow_the_paper_rule_on_a_hand_computed_table():
    from graphopt.passes.acm_gate import labels
    errors = torch.tensor([[8.0, 4.0, 3.9, 1.0, 0.0],    # 4 -> 3.9 improves < 1.2x: label 1
                           [8.0, 7.0, 2.0, 1.0, 0.0],    # 8 -> 7 < 1.2x: label 0
                           [8.0, 4.0, 2.0, 1.0, 0.0]])   # always >= 1.2x: label N
    assert labels(errors, 1.2, 0).tolist() == [1, 0, 4]
    assert labels(errors, 1.2, 1).tolist() == [1, 4, 4]  # from k = 1 on (projections): the second row never flattens


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_gate_calibration_meets_the_budget_on_its_rows(budget):
    from graphopt.passes.acm_gate import calibrate, choices
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2000, 8, generator=g), torch.randn(N + 1, 8, generator=g), torch.randn(N + 1, generator=g)
    cost = torch.tensor(SPLITS, dtype=torch.float32) / SPLITS[-1]
    bias, reached = calibrate(x, w, b, cost, budget, 0)
    achieved = float(cost[choices(x, w, bias, 0)].mean())
    assert achieved <= budget + 1e-6 and budget - achieved < 0.02 and abs(achieved - reached) < 1e-3
