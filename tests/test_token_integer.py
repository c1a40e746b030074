"""token_merge with integer_only, in both orders: the integer merge op against plain-loop integer
arithmetic, ONNX Runtime bit-exact against the reference, and the digits-trained ViT end to end
(integer-only graph, token counts of the schedule at run time, accuracy near the float ToMe model)."""
import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.backends.torch_backend import run
from graphopt.ir.interpreter import collect
from graphopt.ir import Graph, TensorType
from graphopt.ir.ops.integer_tokens import int_token_merge, lookup
from graphopt.passes import PassError, PassManager
from graphopt.passes.integer_only import float_ops
from graphopt.passes.integer_only.tokens import key_shift

I32 = torch.int32


def _merge_loops(x, keys, sizes, r, protected, shift):
    """One image, Python integers: score = sign(a.b) floor((a.b)^2 2^20 / (|a|^2 |b|^2)) of keys >> shift,
    best B per A (first on ties), the r best A (lower first on ties) merge; means round half away from 0."""
    n = len(x)
    k = [[v >> shift for v in row] for row in keys]
    a_pos, b_pos = list(range(protected, n, 2)), list(range(protected + 1, n, 2))
    r = max(0, min(r, (n - protected) // 2))

    def score(i, j):
        dot = sum(u * v for u, v in zip(k[i], k[j]))
        den = max(sum(u * u for u in k[i]), 1) * max(sum(v * v for v in k[j]), 1)
        mag = dot * dot * 2 ** 20 // den
        return -mag if dot < 0 else mag

    edges = []
    for ai in a_pos:
        scores = [score(ai, bj) for bj in b_pos]
        best = max(range(len(scores)), key=lambda j: (scores[j], -j))
        edges.append((scores[best], ai, b_pos[best]))
    edges.sort(key=lambda e: (-e[0], e[1]))
    into, gone = {}, set()
    for _, ai, bj in edges[:r]:
        into.setdefault(bj, []).append(ai)
        gone.add(ai)
    rows, new_sizes = [], []
    for t in range(n):
        if t in gone:
            continue
        members = [t] + into.get(t, [])
        s = sum(sizes[m][0] for m in members)
        totals = [sum(x[m][c] * sizes[m][0] for m in members) for c in range(len(x[t]))]
        rows.append([(1 if v >= 0 else -1) * ((2 * abs(v) + s) // (2 * s)) for v in totals])
        new_sizes.append([s])
    return rows, new_sizes


def _random_case(n=19, seed=0, key_range=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-30000, 30000, (3, n, 6), generator=g, dtype=I32)
    keys = torch.randint(-key_range, key_range + 1, (3, n, 5), generator=g, dtype=I32)
    sizes = torch.randint(1, 6, (3, n, 1), generator=g, dtype=I32)
    return x, keys, sizes


@pytest.mark.parametrize("r,protected,shift,key_range", [(5, 1, 0, 2), (9, 2, 0, 120), (4, 0, 3, 3000), (0, 1, 0, 5)])
def test_int_token_merge_equals_integer_loops(r, protected, shift, key_range):
    x, keys, sizes = _random_case(seed=r + key_range, key_range=key_range)  # key_range 2: many tied scores
    merged, new_sizes = int_token_merge(x, keys, sizes, r=r, protected=protected, shift=shift)
    assert merged.dtype == I32 and new_sizes.dtype == I32
    for b in range(x.shape[0]):
        rows, counts = _merge_loops(x[b].tolist(), keys[b].tolist(), sizes[b].tolist(), r, protected, shift)
        assert merged[b].tolist() == rows and new_sizes[b].tolist() == counts
    assert (new_sizes.sum(1) == sizes.sum(1)).all()


def test_key_shift_keeps_scores_in_int64():
    for bound, d in ((128 * 6, 64), (2 ** 15, 128), (128, 24)):
        s = key_shift(bound, d)
        assert d * ((bound >> s) + 1) ** 2 < 2 ** 21.5 and (s == 0 or d * ((bound >> (s - 1)) + 1) ** 2 >= 2 ** 21)


def test_onnxruntime_bit_exact_on_integer_ops():
    pytest.importorskip("onnxruntime")
    g = Graph()
    x = g.add_input("x", TensorType(I32, ("batch", 19, 6)))
    k = g.add_input("k", TensorType(I32, ("batch", 19, 5)))
    s = g.add_input("s", TensorType(I32, ("batch", 19, 1)))
    merged, sizes = g.create_node("int.token_merge", [x, k, s], {"r": 7, "protected": 1, "shift": 2}).outputs
    table = g.add_constant(torch.tensor([0, 3, 5, 8, 11], dtype=I32), "table")
    g.set_outputs([merged, sizes, g.op("int.lookup", sizes, table)])
    from graphopt.backends.onnx.tokens import _sums_fit_int32
    assert not _sums_fit_int32(merged.producer)    # x and sizes unbounded graph inputs: the int64 merge
    ort = graphopt.pipeline.OptimizedModel(g, None, "onnxruntime")
    for key_range in (2, 3000):  # 3000: squared norms whose product exceeds 2^31
        inputs = _random_case(key_range=key_range)
        ref = run(g, *inputs)
        assert ref[2].tolist() == lookup(ref[1], table.const).tolist()
        for a, b in zip(ref, ort(*inputs)):
            assert torch.equal(a, b)


# ---- the digits-trained ViT -----------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    """The case, its calibration batches, the float ToMe r=8 accuracy and the integer_only graph."""
    case = zoo.digits_vit()
    calib = [(case.train_images[i:i + 32],) for i in range(0, 64, 32)]
    float_tome = graphopt.optimize(case.model, ["token_merge:r=8"], (case.test_images[:8],))
    base = graphopt.optimize(case.model, ["integer_only"], (case.test_images[:8],), calibration=calib).graph
    return case, calib, case.accuracy(float_tome), base


def _attention_lengths(graph, x):
    shiftmax = graph.find_nodes("int.shiftmax")
    got = next(collect(graph, [(x,)], [n.inputs[0] for n in shiftmax]))
    return [got[n.inputs[0].name].shape[-1] for n in shiftmax]


@pytest.mark.parametrize("integer_first", [True, False])
def test_both_orders_integer_only_on_digits(digits, integer_first):
    case, calib, float_tome_acc, base = digits
    if integer_first:  # the same as optimize(model, ["integer_only", "token_merge:r=8"], ...), reusing the fixture
        g, _ = PassManager(["token_merge:r=8"]).run(base)
        om = graphopt.pipeline.OptimizedModel(g, None, "torch")
    else:
        om = graphopt.optimize(case.model, ["token_merge:r=8", "integer_only"], (case.test_images[:8],),
                               calibration=calib)
        g = om.graph
    assert float_ops(g) == [] and g.op_counts()["int.token_merge"] == 4 and "token_merge" not in g.op_counts()
    assert g.op_counts()["int.lookup"] == 3  # proportional attention in blocks 1..3
    for merge in g.find_nodes("int.token_merge"):     # both orders: the keys are the attention's i8, summed over heads
        assert merge.inputs[1].producer.op == "sum" and merge.inputs[1].producer.inputs[0].type.dtype == torch.int8
    for shiftmax in g.find_nodes("int.shiftmax")[1:]:  # both orders: Shiftmax input + round(X log2(size))
        add = shiftmax.inputs[0].producer
        assert add.op == "add" and sorted(v.producer.op for v in add.inputs) == ["int.lookup", "int.requant"]
    assert _attention_lengths(g, case.test_images[:2]) == [65, 57, 49, 41]
    acc = case.accuracy(om)
    assert abs(acc - float_tome_acc) <= 0.01, (acc, float_tome_acc)
    pytest.importorskip("onnxruntime")
    from graphopt.backends.onnx.tokens import _sums_fit_int32
    assert all(_sums_fit_int32(n) for n in g.find_nodes("int.token_merge"))   # the int32 merge is checked here
    ort = graphopt.pipeline.OptimizedModel(g, None, "onnxruntime")
    x = case.test_images[:64]
    assert torch.equal(ort(x).logits, om(x).logits)


def test_integer_graph_options(digits):
    case, _, _, base = digits
    after, _ = PassManager(["token_merge:r_list=0,6,0,3,prop_attn=false"]).run(base)
    assert _attention_lengths(after, case.test_images[:2]) == [65, 65, 59, 59]
    assert "int.lookup" not in after.op_counts()
    with pytest.raises(PassError, match="neither keep_order nor stack != 0; run token_merge before integer_only"):
        PassManager(["token_merge:r=4,keep_order=true"]).run(base)


@pytest.mark.parametrize("passes", [["token_merge:r=2"], ["integer_only", "token_merge:r=2"]])
def test_a_padding_mask_is_refused_in_either_order(passes):
    """A BERT's padding mask: the same refusal before or after integer_only (after it, merging went ahead and
    failed its own type check on the mask's token count)."""
    from tests.tiny_models import padded_ids, tiny_bert

    g = torch.Generator().manual_seed(0)
    calib = [padded_ids(g, 2, 12) for _ in range(2)]
    with pytest.raises(PassError, match=r"mask %\w+ depends on the inputs \(a padding mask\); merged tokens cannot "
                                        r"keep a per-token mask"):
        graphopt.optimize(tiny_bert(32, layers=1), passes, calib[0], calibration=calib)
