"""sparsify: criteria against hand-worked cases, valid N:M / block masks, structured removal against the
original model with the same units zeroed, reformation, allocation, the substitution decision from given
measured times, and a model beyond the zoo (HF ViT / BERT configs, random weights) pruned and run on the
SpMM kernel against its own reference."""
import pytest
import torch

from graphopt.backends.torch_backend import TorchExecutable
from graphopt.frontends import from_torch
from graphopt.ir import verify
from graphopt.ir.interpreter import run as reference_run
from graphopt.passes import PassConfigError, PassError, PassManager
from graphopt.passes.low_rank_calib import row_error
from graphopt.passes.low_rank_layers import find_layers
from graphopt.passes.sparse_criteria import mask_from_scores, prune, refit_rows, sparsegpt
from graphopt.ir.sparse_decision import decide

W = torch.tensor([[1.0, -3.0, 2.0, 0.5], [4.0, -1.0, 0.2, 3.0]])


pytestmark = pytest.mark.usefixtures("one_thread")


def run_sparsify(graph, calibration=None, **options):
    out, report = PassManager([("sparsify", {"timing_cache": "none", **options})], calibration=calibration).run(graph)
    verify(out)
    return out, report["sparsify"]


# ---- criteria (hand-worked) ---------------------------------------------------------------------------
def test_magnitude_drops_the_smallest_half_of_each_row():
    assert torch.equal(prune(W, "magnitude", "unstructured", 0.5), torch.tensor([[0.0, -3, 2, 0], [4, 0, 0, 3]]))


def test_wanda_weighs_by_the_input_channel_norm():
    gram = torch.diag(torch.tensor([100.0, 1.0, 1.0, 100.0]))      # channel norms 10, 1, 1, 10
    # row 0 scores |w| * norm = 10, 3, 2, 5: keeps columns 0 and 3 (magnitude would keep 1 and 2)
    assert torch.equal(prune(W, "wanda", "unstructured", 0.5, gram), torch.tensor([[1.0, 0, 0, 0.5], [4, 0, 0, 3]]))


def test_sparsegpt_moves_a_pruned_weight_onto_its_duplicate_input():
    """Two identical inputs (Gram all ones), damping 0.01: OBS removes w0 = 2 (it can be compensated) and
    adds w0 * H01 / H11 = 2 / 1.01 to w1, so x (w0 + w1) is nearly kept; magnitude just drops w1."""
    w = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    gram = torch.ones(2, 2, dtype=torch.float64)
    out = sparsegpt(w, gram, "unstructured", 0.5, damp=0.01)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0 + 2.0 / 1.01]], dtype=torch.float64))
    assert torch.equal(prune(w, "magnitude", "unstructured", 0.5), torch.tensor([[2.0, 0.0]], dtype=torch.float64))


def test_two_four_keeps_the_two_largest_of_every_four():
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5, 0.1, 0.2, -0.3, 0.4]])
    assert torch.equal(prune(w, "magnitude", "2:4", 0.0), torch.tensor([[0.0, -3, 2, 0, 0, 0, -0.3, 0.4]]))


def test_block1x4_removes_whole_blocks_by_summed_score():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.1, 5.0, 0.1, 0.1]])   # block sums 4 and 5.3
    assert torch.equal(prune(w, "magnitude", "block1x4", 0.5), torch.tensor([[0.0, 0, 0, 0, 0.1, 5.0, 0.1, 0.1]]))


def test_update_refits_the_kept_weights_of_a_wanda_mask():
    """Two identical inputs (Gram all ones, damping 0.01): Wanda drops w0 = 1 and keeps w1 = 2; the update moves
    w0 onto w1 (2 + 1 / 1.01; SparseGPT compensates on the columns after the pruned one), so x (w0 + w1) is nearly
    kept. On random data the mask is Wanda's and the calibration error ‖X (W - W')ᵀ‖² is lower than Wanda's."""
    w = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    out = prune(w, "wanda", "unstructured", 0.5, torch.ones(2, 2, dtype=torch.float64), damp=0.01, update=True)
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0 + 1.0 / 1.01]], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 48, generator=g)
    x = torch.randn(256, 48, generator=g) @ torch.randn(48, 48, generator=g)     # correlated inputs
    gram = x.t() @ x / 256
    plain = prune(w, "wanda", "unstructured", 0.5, gram)
    updated = prune(w, "wanda", "unstructured", 0.5, gram, update=True)
    assert torch.equal(plain == 0, updated == 0)
    err = lambda v: float(((x @ (w - v).t()) ** 2).sum())                       # noqa: E731
    assert err(updated) < 0.85 * err(plain)                                    # 0.79 here


def test_refit_is_the_masked_least_squares_fit():
    """Two identical inputs (x0 = x1, Gram all ones): the mask drops w0 = 1 and keeps w1 = 2; the dense output is
    3x, so the exact fit gives w1 = 3 (SparseGPT's pass gave 2 + 1/1.01), and damping λ pulls it toward the dense
    2: (1 + λ) w1 = 3 + 2λ. On random inputs x' != x_d with a bias, each row equals torch's lstsq of the dense
    output X_d Wᵀ + b on that row's kept columns of [X' 1]."""
    w, drop = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([[True, False]])
    ones = torch.ones(2, 2, dtype=torch.float64)
    fitted, _ = refit_rows(w, drop, ones, ones, damp=0.0)
    torch.testing.assert_close(fitted, torch.tensor([[0.0, 3.0]], dtype=torch.float64))
    fitted, _ = refit_rows(w, drop, ones, ones, damp=0.5)      # λ = 0.5 x mean diagonal 1
    torch.testing.assert_close(fitted, torch.tensor([[0.0, 4.0 / 1.5]], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    xd = torch.randn(50, 6, generator=g, dtype=torch.float64)
    xp = xd + 0.1 * torch.randn(50, 6, generator=g, dtype=torch.float64)       # the pruned model's input
    drop = torch.rand(5, 6, generator=g) < 0.5
    a, d = (torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1) for x in (xp, xd))
    fitted, bias = refit_rows(w, drop, a.t() @ a / 50, a.t() @ d / 50, damp=0.0, bias=b)
    y = xd @ w.t() + b
    for i in range(5):
        kept = (~drop[i]).nonzero().flatten()
        expected = torch.linalg.lstsq(a[:, torch.cat([kept, torch.tensor([6])])], y[:, i:i + 1]).solution.flatten()
        torch.testing.assert_close(fitted[i, kept], expected[:-1])
        torch.testing.assert_close(bias[i], expected[-1])
        assert (fitted[i, drop[i]] == 0).all()


def test_refit_with_a_shift_fits_the_shifted_target():
    """shift = E[[x';1] δᵀ]: each row is torch's lstsq of the dense output plus δ (the residual stream's error)
    on its kept columns of [X' 1]; with damping, the same lstsq with sqrt(λ)·I rows pulling toward the dense
    weights appended."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    xd = torch.randn(40, 6, generator=g, dtype=torch.float64)
    xp = xd + 0.2 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    delta = torch.randn(40, 4, generator=g, dtype=torch.float64)
    drop = torch.rand(4, 6, generator=g) < 0.5
    a, d = (torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1) for x in (xp, xd))
    gram = a.t() @ a / 40
    lam = 0.3 * float(gram.diagonal()[:6].mean())
    fitted, bias = refit_rows(w, drop, gram, a.t() @ d / 40, damp=0.3, bias=b, shift=a.t() @ delta / 40)
    y = xd @ w.t() + b + delta
    theta = torch.cat([w, b[:, None]], 1)
    for i in range(4):
        cols = torch.cat([(~drop[i]).nonzero().flatten(), torch.tensor([6])])
        design = torch.cat([a[:, cols] / 40 ** 0.5, lam ** 0.5 * torch.eye(len(cols), dtype=torch.float64)])
        target = torch.cat([y[:, i] / 40 ** 0.5, lam ** 0.5 * theta[i, cols]])
        expected = torch.linalg.lstsq(design, target[:, None]).solution.flatten()
        torch.testing.assert_close(fitted[i, cols[:-1]], expected[:-1])
        torch.testing.assert_close(bias[i], expected[-1])


def test_residual_refit_target_is_the_dense_residual_sum():
    """y = h + b(h), h = a(x), both pruned sequentially with refit_target=residual: a (its output also read by
    the add) is fitted to the dense a(x); b to the dense sum minus the residual it really receives,
    h_d + b_d(h_d) - h'. Checked against torch's damped lstsq on the explicit activations (h' from the pruned
    a read off the output graph)."""
    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            h = self.a(x)
            return h + self.b(h)

    torch.manual_seed(0)
    model = Residual().eval()
    batches = [(torch.randn(16, 8),) for _ in range(4)]
    graph = from_torch(model, (batches[0][0],))
    out, _ = run_sparsify(graph, batches, criterion="wanda", sparsity=0.5, refit=True, damp=0.1,
                          refit_target="residual", substitute="never")
    pruned = {l.name: (l.matrix.double(), l.node.inputs[2].const.double()) for l in find_layers(out)}
    x = torch.cat([b[0] for b in batches]).double()
    dense = {n: (m.weight.detach().double(), m.bias.detach().double()) for n, m in (("a", model.a), ("b", model.b))}
    h_d = x @ dense["a"][0].t() + dense["a"][1]
    h_p = x @ pruned["a"][0].t() + pruned["a"][1]
    target = h_d + h_d @ dense["b"][0].t() + dense["b"][1] - h_p
    a = torch.cat([h_p, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    lam = 0.1 * float((a.t() @ a / len(x)).diagonal()[:8].mean())
    theta = torch.cat([dense["b"][0], dense["b"][1][:, None]], 1)
    w, bias = pruned["b"]
    assert (w == 0).sum() == 32
    for i in range(8):
        cols = torch.cat([(w[i] != 0).nonzero().flatten(), torch.tensor([8])])
        design = torch.cat([a[:, cols] / len(x) ** 0.5, lam ** 0.5 * torch.eye(len(cols), dtype=torch.float64)])
        rhs = torch.cat([target[:, i] / len(x) ** 0.5, lam ** 0.5 * theta[i, cols]])
        expected = torch.linalg.lstsq(design, rhs[:, None]).solution.flatten()
        torch.testing.assert_close(w[i, cols[:-1]], expected[:-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bias[i], expected[-1], atol=1e-4, rtol=1e-4)


def test_refit_keeps_the_wanda_mask_and_lowers_the_calibration_error():
    """Sequential Wanda on a tiny BERT, with and without the least-squares refit: every layer keeps as many
    weights (Wanda's per-row masks; later masks read the inputs of the model pruned so far, which the refit
    changes) and the refitted model's outputs are closer to the dense model's on the calibration batches."""
    _, graph, batches = tiny_bert(seed=1)
    batches = batches + [(torch.randint(0, 60, (2, 10)), torch.ones(2, 10, dtype=torch.long)) for _ in range(10)]
    dense = [list(reference_run(graph, *b)) for b in batches]
    errors, sparsities = {}, {}
    for refit in (False, True):
        out, record = run_sparsify(graph, batches, criterion="wanda", sparsity=0.5, refit=refit, substitute="never")
        sparsities[refit] = {k: v["sparsity"] for k, v in record.details["layers"].items()}
        errors[refit] = row_error(dense, [list(reference_run(out, *b)) for b in batches])
    assert sparsities[True] == sparsities[False]
    assert errors[True] < 0.7 * errors[False]


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_n_m_masks_are_valid(pattern, n, m, criterion):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 40, generator=g)
    x = torch.randn(64, 40, generator=g)
    out = prune(w, criterion, pattern, 0.0, x.t() @ x / 64)
    per_group = (out != 0).reshape(12, -1, m).sum(-1)
    assert torch.equal(per_group, torch.full_like(per_group, n))


def test_an_n_m_pattern_says_it_does_not_use_the_sparsity_option():
    _, graph, batches = tiny_bert(seed=3)
    out, record = run_sparsify(graph, batches, criterion="magnitude", pattern="4:8", sparsity=0.9, roles=["mlp"],
                               substitute="never")
    assert "pattern 4:8 fixes the sparsity at 50% of each layer's weights; sparsity=0.9 is not used" in record.notes
    assert all(abs(d["sparsity"] - 0.5) < 1e-6 for d in record.details["layers"].values())
    _, record = run_sparsify(graph, batches, criterion="magnitude", pattern="2:4", roles=["mlp"], substitute="never")
    assert not any("is not used" in n for n in record.notes)        # the default 0.5 is what 2:4 gives


def test_unstructured_and_block_masks_have_the_requested_sparsity():
    s = torch.rand(6, 32, generator=torch.Generator().manual_seed(1))
    assert (mask_from_scores(s, "unstructured", 0.75).sum(1) == 24).all()
    drop = mask_from_scores(s, "block1x4", 0.5)
    assert (drop.reshape(6, 8, 4).all(-1) | ~drop.reshape(6, 8, 4).any(-1)).all()   # whole blocks only
    assert (drop.sum(1) == 16).all()


# ---- models ---------------------------------------------------------------------------------------------
def tiny_bert(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 60, (2, 10))
    graph = from_torch(model, (), {"input_ids": ids, "attention_mask": torch.ones(2, 10, dtype=torch.long)})
    batches = [(torch.randint(0, 60, (2, 10)), torch.ones(2, 10, dtype=torch.long)) for _ in range(6)]
    return model, graph, batches


def tiny_vit(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=96)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    graph = from_torch(model, (torch.randn(2, 3, 16, 16),))
    return model, graph, [(torch.randn(2, 3, 16, 16),) for _ in range(4)]


def test_structured_removal_equals_the_model_with_those_units_zeroed():
    """Without reformation, removing heads / neurons must compute exactly what the original HF model
    computes with the removed units' columns of the output projection / fc2 set to zero."""
    model, graph, batches = tiny_bert()
    out, record = run_sparsify(graph, batches, criterion="magnitude", pattern="structured", sparsity=0.5, reform=False)
    groups = record.details["groups"]
    for i, layer in enumerate(model.encoder.layer):
        heads = groups[f"blocks.{i}.heads"]
        neurons = groups[f"blocks.{i}.neurons"]
        assert heads["kept"] == 2 and neurons["kept"] == 32
        with torch.no_grad():
            cut = torch.ones(32, dtype=torch.bool)
            for h in heads["kept_units"]:
                cut[h * 8:(h + 1) * 8] = False
            layer.attention.output.dense.weight[:, cut] = 0
            cut = torch.ones(64, dtype=torch.bool)
            cut[neurons["kept_units"]] = False
            layer.output.dense.weight[:, cut] = 0
    shapes = sorted(tuple(v.type.shape) for v in out.constants.values() if v.type.rank == 2 and 64 in v.type.shape)
    assert shapes == [] or all(32 in s for s in shapes)            # fc1 / fc2 are now 32 wide
    assert {tuple(n.inputs[1].type.shape) for n in out.find_nodes("linear")} == {(16, 32), (32, 16), (32, 32)}
    ids, mask = batches[0]
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(TorchExecutable(out)(input_ids=ids, attention_mask=mask).last_hidden_state, expected,
                               atol=1e-4, rtol=1e-4)


def test_reformation_lowers_the_calibration_error():
    _, graph, batches = tiny_bert(seed=1)
    batches = batches + [(torch.randint(0, 60, (2, 10)), torch.ones(2, 10, dtype=torch.long)) for _ in range(10)]
    dense = [list(reference_run(graph, *b)) for b in batches]
    errors = {}
    for reform in (False, True):
        out, record = run_sparsify(graph, batches, criterion="wanda", pattern="neurons", sparsity=0.5, reform=reform)
        assert all(g["reformed"] == reform for g in record.details["groups"].values())
        errors[reform] = row_error(dense, [list(reference_run(out, *b)) for b in batches])
    assert errors[True] < 0.7 * errors[False]
    # too few calibration rows for the kept columns: reformation is skipped, not overfitted
    _, record = run_sparsify(graph, batches[:3], criterion="wanda", pattern="neurons", sparsity=0.5)
    assert not any(g["reformed"] for g in record.details["groups"].values())
    assert any("would overfit" in n for n in record.notes)


def test_sequential_reformation_is_the_least_squares_fit_to_the_dense_output():
    """Block 1's fc2, after block 0 lost half its neurons: the refitted [W b] equals torch's lstsq of the dense
    model's fc2 output (hooked in the original HF model) on [h 1], h the pruned graph's kept fc2 inputs.
    (sequential=false, fitted on the dense model's own fc2 inputs, is 3e-4 off.)"""
    from graphopt.ir.interpreter import collect
    from graphopt.passes.low_rank_layers import find_layers

    model, graph, batches = tiny_bert(seed=1)
    batches = batches + [(torch.randint(0, 60, (2, 10)), torch.ones(2, 10, dtype=torch.long)) for _ in range(10)]
    out, record = run_sparsify(graph, batches, criterion="wanda", pattern="neurons", sparsity=0.5, ridge=0.0)
    assert all(g["reformed"] for g in record.details["groups"].values())
    sink = next(l for l in find_layers(out) if l.name == "encoder.layer.1.output.dense")
    h = torch.cat([found[sink.input.name].reshape(-1, 32) for found in collect(out, batches, [sink.input])])
    targets = []
    hook = model.encoder.layer[1].output.dense.register_forward_hook(lambda m, i, o: targets.append(o.reshape(-1, 32)))
    with torch.no_grad():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
    hook.remove()
    h1 = torch.cat([h, torch.ones(h.shape[0], 1)], 1).double()
    expected = torch.linalg.lstsq(h1, torch.cat(targets).double()).solution.t()
    bias = next(n for n in sink.node.inputs[2:] if n is not None).const
    torch.testing.assert_close(torch.cat([sink.matrix, bias[:, None]], 1).double(), expected, atol=1e-5, rtol=1e-4)


def test_sensitivity_allocation_meets_the_budget_with_uneven_layers():
    _, graph, batches = tiny_bert(seed=2)
    out, record = run_sparsify(graph, batches, criterion="magnitude", sparsity=0.6, allocation="sensitivity",
                               roles=["mlp"], substitute="never", candidates=[0.3, 0.5, 0.7, 0.9])
    layers = record.details["layers"]
    kept = sum((1 - d["sparsity"]) * d["shape"][0] * d["shape"][1] for d in layers.values())
    total = sum(d["shape"][0] * d["shape"][1] for d in layers.values())
    assert kept <= 0.4 * total + 1e-6
    assert len({round(d["sparsity"], 2) for d in layers.values()}) > 1


def test_decision_follows_the_measured_times():
    fast = decide("a", (64, 32), 100, 0.9, "csr", dense_ms=2.0, sparse_ms=1.0, margin=0.1)
    close = decide("b", (64, 32), 100, 0.9, "csr", dense_ms=2.0, sparse_ms=1.9, margin=0.1)
    slow = decide("c", (64, 32), 100, 0.5, "csr", dense_ms=1.0, sparse_ms=3.0, margin=0.1)
    assert fast.sparse and "2.00x faster" in fast.why
    assert not close.sparse and "margin" in close.why
    assert not slow.sparse and "below break-even" in slow.why
    assert not decide("d", (4, 4), 1, 0.9, "csr", None, None, 0.1).sparse


def test_substitution_uses_the_given_timings_and_keeps_the_outputs():
    _, graph, batches = tiny_bert(seed=3)
    pruned, _ = run_sparsify(graph, batches, criterion="magnitude", sparsity=0.8, roles=["mlp"], substitute="never")
    names = [f"encoder.layer.{i}.{p}" for i in range(2) for p in ("intermediate.dense", "output.dense")]
    timings = {names[0]: [2.0, 1.0], names[1]: [1.0, 4.0], names[2]: [3.0, 1.0], names[3]: "1.0/0.95"}
    out, record = run_sparsify(graph, batches, criterion="magnitude", sparsity=0.8, roles=["mlp"], timings=timings)
    layers = record.details["layers"]
    assert [layers[n]["decision"] for n in names] == ["sparse", "dense", "sparse", "dense"]
    assert "below break-even" in layers[names[1]]["why"] and "margin" in layers[names[3]]["why"]
    assert len(out.find_nodes("sparse_linear")) == 2
    for b in batches[:2]:
        torch.testing.assert_close(TorchExecutable(out).run_flat(*b), reference_run(pruned, *b), atol=1e-4, rtol=1e-4)


def test_timings_for_a_layer_it_does_not_prune_are_refused_with_the_names():
    # ViT names copied onto BERT once decided nothing, without a word
    _, graph, batches = tiny_bert(seed=3)
    with pytest.raises(PassError, match=r"timings names \['layers\.0\.mlp\.fc1'\], which are not layers it prunes; "
                                        r"those are: encoder\.layer\.0\.intermediate\.dense"):
        run_sparsify(graph, batches, criterion="magnitude", sparsity=0.8, roles=["mlp"],
                     timings={"layers.0.mlp.fc1": [2.0, 1.0]})


def test_vit_beyond_the_zoo_pruned_and_run_on_the_spmm_kernel():
    """A ViT from a config (not in the zoo): 1x4-block and unstructured sparse layers run on the C kernel
    and match the same graph on the reference ops; structured pruning keeps it runnable too."""
    _, graph, batches = tiny_vit()
    for options in ({"criterion": "wanda", "sparsity": 0.7, "substitute": "always"},
                    {"criterion": "sparsegpt", "pattern": "block1x4", "sparsity": 0.5, "substitute": "always"},
                    {"criterion": "wanda", "pattern": "structured", "sparsity": 0.25}):
        out, _ = run_sparsify(graph, batches, **options)
        if options.get("substitute") == "always":
            assert len(out.find_nodes("sparse_linear")) == 12
        for b in batches[:2]:
            torch.testing.assert_close(TorchExecutable(out).run_flat(*b), reference_run(out, *b), atol=1e-4,
                                       rtol=1e-4)


def test_bad_options_are_clear_errors():
    _, graph, batches = tiny_bert()
    with pytest.raises((PassError, PassConfigError), match="unknown pattern"):
        run_sparsify(graph, batches, pattern="diagonal")
    with pytest.raises((PassError, PassConfigError), match="fixes the sparsity"):
        run_sparsify(graph, batches, pattern="2:4", allocation="sensitivity")
    with pytest.raises((PassError, PassConfigError), match="calibration"):
        run_sparsify(graph, None, criterion="wanda")
    with pytest.raises((PassError, PassConfigError), match="refit=true fits the kept weights"):
        run_sparsify(graph, batches, refit=True, bias_correction=True)


def test_onnx_lowering_writes_the_pruned_weights_dense():
    """ONNX Runtime densifies sparse initialisers: the lowering writes the dense matrix, same outputs."""
    from graphopt.backends.onnxruntime_backend import OnnxRuntimeExecutable

    _, graph, batches = tiny_vit(seed=4)
    out, _ = run_sparsify(graph, batches, criterion="magnitude", sparsity=0.8, substitute="always", roles=["mlp"])
    assert out.find_nodes("sparse_linear")
    for b in batches[:1]:
        torch.testing.assert_close(OnnxRuntimeExecutable(out).run_flat(*b), reference_run(out, *b), atol=1e-4,
                                   rtol=1e-4)


def test_measured_times_come_from_the_target_timer_and_are_cached(tmp_path):
    """A registered timer is called once per layer shape and sparsity; a second run reads the cache."""
    from graphopt.ir.ops.sparse import SPMM_TIMERS, register_spmm_timer

    calls = []

    def fake_timer(weight, fmt, rows, threads):
        calls.append((tuple(weight.shape), fmt, rows, threads))
        return (1.0, 0.5) if weight.shape[0] > weight.shape[1] else (1.0, 2.0)   # fc1 faster sparse, fc2 not

    fake_timer.machine = "test machine"
    if "test-fake" not in SPMM_TIMERS:
        register_spmm_timer("test-fake")(fake_timer)
    else:
        register_spmm_timer("test-fake", replace=True)(fake_timer)
    _, graph, batches = tiny_bert(seed=5)
    cache = str(tmp_path / "timings.json")
    options = dict(criterion="magnitude", sparsity=0.9, roles=["mlp"], target="test-fake", timing_cache=cache,
                   rows=20, threads=1)
    out, record = PassManager([("sparsify", options)], calibration=batches).run(graph)
    assert len(calls) == 2 and {c[2:] for c in calls} == {(20, 1)}   # two distinct shapes, measured once each
    assert {n.attrs["out_features"] for n in out.find_nodes("sparse_linear")} == {64}
    again, record = PassManager([("sparsify", options)], calibration=batches).run(graph)
    assert len(calls) == 2 and "cached" in record["sparsify"].details["layers"]["encoder.layer.0.output.dense"]["why"]


def test_structured_groups_are_selected_by_name():
    _, graph, batches = tiny_bert(seed=6)
    out, record = run_sparsify(graph, batches, criterion="magnitude", pattern="structured", sparsity=0.5,
                               layers=["blocks.1.*"], exclude=["blocks.1.heads"], reform=False)
    assert set(record.details["groups"]) == {"blocks.1.neurons"}
    with pytest.raises((PassError, PassConfigError), match="blocks.0.heads"):
        run_sparsify(graph, batches, pattern="heads", layers=["blocks.9.*"], reform=False, criterion="magnitude")


def test_bias_correction_keeps_the_mean_of_each_corrected_output():
    """Sequential Wanda with bias correction: on the calibration batches, the mean over tokens of every out /
    fc1 / fc2 layer's output in the pruned model equals the dense model's (the v projection is left alone)."""
    from graphopt.ir.interpreter import collect
    from graphopt.passes.low_rank_layers import find_layers

    _, graph, batches = tiny_bert()
    out, record = run_sparsify(graph, batches, criterion="wanda", sparsity=0.5, bias_correction=True,
                               sequential=True)
    dense = {l.name: l for l in find_layers(graph)}
    pruned = {l.name: l for l in find_layers(out)}
    assert {l.role for l in pruned.values()} >= {"v", "out", "fc1", "fc2"}

    def means(g, layers):
        rows = {l.name: [] for l in layers}
        for found in collect(g, batches, [l.node.output for l in layers]):
            for l in layers:
                rows[l.name].append(found[l.node.output.name].reshape(-1, l.shape[0]).double())
        return {k: torch.cat(v).mean(0) for k, v in rows.items()}

    want, got = means(graph, list(dense.values())), means(out, list(pruned.values()))
    for name, l in pruned.items():
        same = torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-5)
        assert same == (l.role in ("out", "fc1", "fc2")), (name, l.role)
