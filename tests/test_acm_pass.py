"""The acm pass: k = N is the original model, k = 0 the residual stream alone, the gate meets its budget on
calibration batches it never saw, clear errors for models it cannot convert, a model beyond the zoo, and
composition with token_merge / token_drop / low_rank (either order) and integer_only (refused)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.backends.torch_backend import run
from graphopt.frontends import from_torch
from graphopt.ir.interpreter import collect
from graphopt.passes import PassError, PassManager

BUDGET_TOLERANCE = 0.06  # |mean FLOP fraction on unseen batches - budget|, per module


def images(n, seed, batch=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def vit(tiny_vit_case):
    return tiny_vit_case.model, from_torch(tiny_vit_case.model, tiny_vit_case.args, {})


@pytest.fixture(scope="module")
def half(vit):
    return PassManager([("acm", {"budget": 0.5})], calibration=images(6, 1)).run(vit[1])


def outputs(graph, batches):
    return [run(graph, *b)[0] for b in batches]


def test_k_n_reproduces_the_original_model(vit):
    model, graph = vit
    out, _ = PassManager([("acm", {"budget": 1.0})], calibration=images(4, 1)).run(graph)
    assert out.op_counts().get("acm") == 2 and "gelu" not in out.op_counts()
    for (x,) in images(2, 9):
        torch.testing.assert_close(run(out, x)[0], model(x), atol=1e-5, rtol=1e-5)


def test_projections_too_at_k_n_and_never_below_one_learner(vit):
    """q/k/v (one fused qkv linear here) and the output projection as ACMs of SVD-LLM factor groups. Full-rank
    factors cost more than the dense layer, so a budget of 1 does not reach k = N: the gates are forced there."""
    model, graph = vit
    options = {"budget": 0.4, "modules": ["mlp", "q", "k", "v", "out"], "n": 2, "max_rows": 512}
    out, _ = PassManager([("acm", options)], calibration=images(3, 1)).run(graph)
    gates = out.find_nodes("acm_gate")
    assert out.op_counts().get("acm") == 6 and out.op_counts().get("linear") == 1  # only the classifier head
    assert sorted(n.attrs["min_k"] for n in gates) == [0, 0, 1, 1, 1, 1]
    x = images(1, 9)[0][0]
    for found in collect(out, [(x,)], [n.output for n in gates]):
        for gate in gates:
            assert found[gate.output.name].min() >= gate.attrs["min_k"]
    for gate in gates:
        out.set_input(gate, 2, out.add_constant(torch.tensor([0, 0, 1e4]), "force_k_n"))
    torch.testing.assert_close(run(out, x)[0], model(x), atol=1e-4, rtol=1e-4)


def test_k_0_gives_the_residual_stream_only(vit, half):
    """Every gate forced to k = 0: the model equals the original with its MLPs' outputs zeroed."""
    model, _ = vit
    forced = half[0].clone()
    for node in forced.find_nodes("acm_gate"):
        forced.set_input(node, 2, forced.add_constant(torch.tensor([1e4, 0, 0, 0, 0.]), "force_k0"))
    no_mlp = copy.deepcopy(model)
    for block in no_mlp.blocks:
        nn.init.zeros_(block.fc2.weight)
        nn.init.zeros_(block.fc2.bias)
    x = images(1, 3)[0][0]
    torch.testing.assert_close(run(forced, x)[0], no_mlp(x), atol=1e-5, rtol=1e-5)


def test_the_gate_meets_the_budget_on_unseen_calibration_batches(half):
    graph, report = half
    gates = graph.find_nodes("acm_gate")
    cores = {id(n.inputs[1]): n for n in graph.find_nodes("acm")}
    fractions = {g.output.name: [] for g in gates}
    for found in collect(graph, images(4, 77), [g.output for g in gates]):  # batches the pass never saw
        for g in gates:
            splits = cores[id(g.output)].attrs["splits"]
            cost = torch.tensor(splits, dtype=torch.float64) / splits[-1]
            fractions[g.output.name].append(cost[found[g.output.name].reshape(-1)])
    for name, parts in fractions.items():
        assert abs(float(torch.cat(parts).mean()) - 0.5) <= BUDGET_TOLERANCE, name
    record = report["acm"]
    assert record.counters["converted"] == 2
    for layer in record.details["acm"].values():  # the report's measured k distribution per layer
        assert abs(sum(layer["k_distribution"]) - 1) < 1e-9 and len(layer["k_distribution"]) == 5
        assert abs(layer["measured_fraction"] - 0.5) <= BUDGET_TOLERANCE
    assert sum("k = 0:" in note for note in record.notes) == 2


def test_cost_model_charges_the_expected_flops(vit, half):
    from graphopt.ir.cost import graph_cost
    before, after = graph_cost(vit[1]).total.at(batch=1)["flops"], graph_cost(half[0]).total.at(batch=1)["flops"]
    mlp = 2 * 2 * (2 * 65 * 64 * 256)  # two blocks of fc1 + fc2 (a multiply-add is 2 FLOPs)
    saved = before - after
    assert 0.4 * mlp < saved < 0.6 * mlp, (before, after)


class _AttentionOnly(nn.Module):
    def __init__(self, dim=32, heads=2, act=None):
        super().__init__()
        self.heads, self.act = heads, act
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        if self.act is None:
            return x
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


@pytest.mark.parametrize("act, words", [(None, ["acm needs transformer MLPs", "MLP"]),
                                        (torch.tanh, ["unsupported activation", "tanh", "block 0 MLP"])])
def test_clear_error_for_a_model_it_cannot_convert(act, words):
    torch.manual_seed(0)
    model = _AttentionOnly(act=act).eval()
    x = torch.randn(2, 6, 32)
    with pytest.raises(PassError) as info:
        graphopt.optimize(model, ["acm"], (x,), calibration=[(x,)], progress=False)
    for word in words:
        assert word in str(info.value)


def test_a_llama_style_model_beyond_the_zoo_matches_at_k_n():
    """SwiGLU MLP, RMSNorm, rotary positions: a random-weight LlamaModel built offline from its config."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaModel(config).eval()
    ids = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    om = graphopt.optimize(model, [("acm", {"budget": 1.0})], {"input_ids": ids[0], "use_cache": False},
                           calibration=[{"input_ids": i, "use_cache": False} for i in ids[1:]], progress=False)
    assert om.graph.op_counts().get("acm") == 2
    assert all(n.inputs[6] is not None for n in om.graph.find_nodes("acm"))  # the gated branch was kept
    with torch.no_grad():
        expected = model(input_ids=ids[0], use_cache=False).last_hidden_state
    torch.testing.assert_close(om(input_ids=ids[0], use_cache=False).last_hidden_state, expected,
                               atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def digits(digits_case):
    graph = from_torch(digits_case.model, (), digits_case.kwargs)
    imgs = digits_case.train_images
    return graph, [(imgs[i:i + 16],) for i in range(0, 32, 16)], (digits_case.test_images[:8],)


@pytest.mark.parametrize("other", [("token_merge", {"r": 8}), ("token_drop", {"keep": 0.5, "layer": 1}),
                                   ("low_rank", {"method": "svd", "ratio": 0.5, "roles": ["qkv"]})])
def test_composes_with_token_and_low_rank_passes_in_either_order(digits, other):
    """At budget 1 acm is exact, so either order must equal the other pass alone (low_rank factorises the
    attention projections here; acm converts the MLPs)."""
    graph, calib, x = digits
    alone, _ = PassManager([other], calibration=calib).run(graph)
    quick = {"n": 2, "max_rows": 256, "holdout": 0.0}
    for order in ([("acm", dict(quick, budget=1.0)), other], [other, ("acm", dict(quick, budget=1.0))]):
        out, _ = PassManager(order, calibration=calib).run(graph)
        assert out.op_counts().get("acm") == 4, order
        torch.testing.assert_close(run(out, *x)[0], run(alone, *x)[0], atol=1e-4, rtol=1e-4)
    if other[0] == "token_merge":  # a real budget: the merged graph's MLPs run grouped on fewer tokens
        reduced, _ = PassManager([other, ("acm", dict(quick, budget=0.5))], calibration=calib).run(graph)
        assert reduced.op_counts().get("acm") == 4 and run(reduced, *x)[0].shape == (8, 10)


def test_a_projection_low_rank_factorised_is_refused_naming_it(digits):
    graph, calib, _ = digits
    with pytest.raises(PassError, match="block 0 MLP fc1 is factorised \\(low_rank ran on it\\).*run acm before low_rank"):
        PassManager([("low_rank", {"method": "svd", "ratio": 0.5, "roles": ["mlp"]}), ("acm", {"n": 2})],
                    calibration=calib).run(graph)


def test_integer_only_refuses_either_order_naming_the_reason(vit, half):
    calib = images(2, 2)
    with pytest.raises(PassError, match="has no integer form"):
        PassManager(["integer_only"], calibration=calib).run(half[0])
    integer, _ = PassManager(["integer_only"], calibration=calib).run(vit[1])
    with pytest.raises(PassError, match="integer-only graph"):
        PassManager(["acm"], calibration=calib).run(integer)


def test_compensation_removes_each_prefix_mean_error_and_keeps_k_n_and_k_0_exact():
    """A GELU MLP with a large positive fc1 bias (GELU outputs far from zero mean): after compensation the acm
    op's reference gives, for each truncated prefix, zero mean error over the calibration rows (without it the
    mean error is large), k = N the MLP exactly and k = 0 zero."""
    from graphopt.ir.ops.acm import acm as acm_reference
    from graphopt.passes.acm_learners import Module, build_learners, compensate

    g = torch.Generator().manual_seed(0)
    d, hidden, m_out, n = 8, 24, 6, 3
    w1, b1 = torch.randn(hidden, d, generator=g), torch.randn(hidden, generator=g) + 2.0
    w2, b2 = torch.randn(m_out, hidden, generator=g), torch.randn(m_out, generator=g)
    x = torch.randn(500, d, generator=g)
    mlp = F.gelu(x @ w1.t() + b1) @ w2.t() + b2  # the independent reference

    def prefixes(module):
        attrs = {"splits": module.splits, "activation": "gelu", "fractions": ()}
        return [acm_reference(x, torch.full((x.shape[0],), k), module.w1, module.b1, module.w2, module.b2,
                              None, None, module.w2r, **attrs) for k in range(n + 1)]

    plain = Module("mlp", 0, "mlp", None, None, w1, b1, w2, b2, "gelu")
    build_learners(plain, x, n, None)
    before = prefixes(plain)
    comp = Module("mlp", 0, "mlp", None, None, w1, b1, w2, b2, "gelu")
    build_learners(comp, x, n, None, spare=True)
    compensate(comp, x)
    after = prefixes(comp)
    assert comp.splits == (0, 8, 16, 26)  # one constant neuron in each learner but the last, widths kept
    for k in range(1, n):
        assert (before[k] - mlp).mean(0).abs().max() > 0.5  # the systematic error compensation removes
        torch.testing.assert_close((after[k] - mlp).mean(0), torch.zeros(m_out), atol=2e-4, rtol=0)
        assert (after[k] - mlp).norm() < (before[k] - mlp).norm()
    torch.testing.assert_close(after[n], mlp, atol=1e-4, rtol=1e-5)
    assert torch.equal(after[0], torch.zeros_like(mlp))


def test_budget_labels_spend_the_budget_where_the_relative_error_is():
    """Hand-made errors: per row the k minimising (err_k / ||output||)² + lam cost_k, lam the smallest that
    meets the budget."""
    from graphopt.passes.acm_gate import budget_labels

    errors = torch.tensor([[10.0, 1.0, 0.0],    # relative errors 1, 0.1, 0
                           [1.0, 0.5, 0.0],     # 1, 0.5, 0
                           [4.0, 0.8, 0.0]])    # 1, 0.2, 0
    cost = torch.tensor([0.0, 0.5, 1.0])
    scale = errors[:, 0]
    assert budget_labels(errors, scale, cost, 1.0, 0).tolist() == [2, 2, 2]
    assert budget_labels(errors, scale, cost, 0.7, 0).tolist() == [1, 2, 1]  # the worst row gets the extra learner
    assert budget_labels(errors, scale, cost, 0.5, 0).tolist() == [1, 1, 1]
    assert budget_labels(errors, scale, cost, 0.1, 0).tolist() == [0, 0, 0]
    assert budget_labels(errors, scale, cost, 0.1, 1).tolist() == [1, 1, 1]  # min_k holds whatever the budget


def test_learners_too_narrow_for_the_compensation_neuron_are_refused_naming_the_module():
    from graphopt.passes.acm_learners import ACMError, Module, build_learners

    g = torch.Generator().manual_seed(0)
    m = Module("block 3 MLP", 3, "mlp", None, None, torch.randn(5, 4, generator=g), torch.zeros(5),
               torch.randn(4, 5, generator=g), torch.zeros(4), "relu")
    with pytest.raises(ACMError, match="block 3 MLP.*no room for the compensation neuron.*compensation=False"):
        build_learners(m, torch.randn(16, 4, generator=g), 4, None, spare=True)
    build_learners(m, torch.randn(16, 4, generator=g), 4, None)  # without it, width 1 learners are fine
    assert m.splits == (0, 1, 2, 4, 5)
