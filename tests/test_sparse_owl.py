"""OWL allocation (passes/sparse_owl.py) against hand-worked cases, and sparsify allocation=owl on a tiny
BERT: each block pruned at the sparsity its outlier ratio gives, the selected weights at the budget."""
import pytest
import torch

from graphopt.passes import PassConfigError, PassError
from graphopt.passes.sparse_criteria import scores
from graphopt.passes.sparse_owl import block_of, outlier_ratio, owl_sparsities
from tests.test_sparse import run_sparsify, tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


def test_outlier_ratio_counts_scores_above_threshold_times_the_common_mean():
    # nine ones and an 11: mean 2, so only the 11 is above 5 x 2; across two tensors the mean is shared
    assert outlier_ratio([torch.tensor([1.0] * 9 + [11.0])], 5.0) == pytest.approx(0.1)
    # [1, 1, 1, 9] and [0, 0, 0, 0]: common mean 1.5; above 3 x 1.5 = 4.5 is the 9 only -> 1 of 8
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 9.0]), torch.zeros(2, 2)], 3.0) == pytest.approx(1 / 8)


def test_owl_sparsities_hand_worked():
    # ratios 0.01 / 0.03 / 0.02 -> scaled to 0 / 0.2 / 0.1 (spread 0.1); equal sizes: mean 0.1 -> 0.6 / 0.4 / 0.5
    assert owl_sparsities([0.01, 0.03, 0.02], [1, 1, 1], 0.5, 0.1) == pytest.approx([0.6, 0.4, 0.5])
    # sizes 2 / 1 / 1: weighted mean of 0 / 0.2 / 0.1 is 0.075 -> 0.575 / 0.375 / 0.475, weighted mean 0.5
    levels = owl_sparsities([0.01, 0.03, 0.02], [2, 1, 1], 0.5, 0.1)
    assert levels == pytest.approx([0.575, 0.375, 0.475])
    assert (2 * levels[0] + levels[1] + levels[2]) / 4 == pytest.approx(0.5)
    assert owl_sparsities([0.02, 0.02], [3, 5], 0.5, 0.1) == [0.5, 0.5]
    with pytest.raises(ValueError, match="spread"):
        owl_sparsities([0.0, 1.0], [1, 1], 0.05, 0.1)


def test_block_of_is_the_name_up_to_its_last_number():
    assert block_of("bert.encoder.layer.3.attention.self.query") == "bert.encoder.layer.3"
    assert block_of("encoder.layer.11.output.dense") == "encoder.layer.11"
    assert block_of("blocks.2") == "blocks.2"
    assert block_of("head") == "head"


def test_sparsify_owl_prunes_each_block_at_its_outlier_sparsity():
    """The blocks' sparsities recomputed here from the dense model's Wanda scores (input norms read off the
    original HF modules with hooks, not the pass's probe) match what the pass pruned, layer by layer."""
    model, graph, batches = tiny_bert(seed=3)
    norms = {}

    def hook(name):
        def record(_module, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            norms.setdefault(name, []).append(x)
        return record

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    blocks = {}
    for n, m in linears.items():
        x = torch.cat(norms[n])
        blocks.setdefault(n.split(".")[2], []).append(scores(m.weight.detach(), "wanda", x.t() @ x / x.shape[0]))
    ratios = [outlier_ratio(s, 2.0) for s in blocks.values()]
    assert ratios[0] != ratios[1]
    expected = owl_sparsities(ratios, [sum(t.numel() for t in s) for s in blocks.values()], 0.5, 0.1)

    _, record = run_sparsify(graph, batches, criterion="wanda", sparsity=0.5, allocation="owl", owl_spread=0.1,
                             owl_threshold=2.0, substitute="never")
    layers = record.details["layers"]
    assert len(layers) == 12
    for name, d in layers.items():
        block = int(name.split(".")[2])
        assert d["target_sparsity"] == pytest.approx(expected[block])
        m, k = d["shape"]
        assert d["sparsity"] == pytest.approx(round(expected[block] * k) / k)   # per-row rounding of the mask
    total = sum(d["shape"][0] * d["shape"][1] for d in layers.values())
    removed = sum(d["sparsity"] * d["shape"][0] * d["shape"][1] for d in layers.values())
    assert removed / total == pytest.approx(0.5, abs=0.01)


def test_owl_is_for_weight_patterns():
    _, graph, batches = tiny_bert()
    with pytest.raises((PassError, PassConfigError), match="allocation=owl spreads weight sparsity"):
        run_sparsify(graph, batches, pattern="neurons", allocation="owl")
