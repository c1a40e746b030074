"""Symbolic cost model against hand-computed FLOPs and the models' parameter counts."""
import pytest
import sympy
import torch

from graphopt.frontends import from_torch
from graphopt.ir import Graph, TensorType
from graphopt.ir.cost import compare, graph_cost, node_cost

F32 = torch.float32
B = sympy.Symbol("batch", integer=True, positive=True)


def single(build):
    g = Graph()
    out = build(g)
    g.set_outputs([out])
    return next(iter(g.nodes)) if len(g) == 1 else list(g.nodes)[-1]


def test_linear_flops_and_bytes():
    node = single(lambda g: g.op.linear(g.add_input("x", TensorType(F32, ("batch", 197, 384))),
                                        g.add_constant(torch.zeros(1536, 384)), g.add_constant(torch.zeros(1536))))
    cost = node_cost(node)
    assert sympy.simplify(cost.flops - (2 * B * 197 * 384 * 1536 + B * 197 * 1536)) == 0
    assert cost.param_bytes == 4 * (1536 * 384 + 1536)
    assert sympy.simplify(cost.bytes_written - 4 * B * 197 * 1536) == 0
    assert sympy.simplify(cost.bytes_read - (4 * B * 197 * 384 + 4 * (1536 * 384 + 1536))) == 0


def test_matmul_flops_with_broadcast_batch():
    node = single(lambda g: g.op.matmul(g.add_input("a", TensorType(F32, ("batch", 6, 197, 64))),
                                        g.add_input("b", TensorType(F32, ("batch", 6, 64, 197)))))
    assert sympy.simplify(node_cost(node).flops - 2 * B * 6 * 197 * 197 * 64) == 0


def test_conv_flops_for_a_patch_embedding():
    node = single(lambda g: g.op.conv2d(g.add_input("x", TensorType(F32, ("batch", 3, 224, 224))),
                                        g.add_constant(torch.zeros(384, 3, 16, 16)), g.add_constant(torch.zeros(384)),
                                        stride=(16, 16)))
    outputs = 384 * 14 * 14
    assert sympy.simplify(node_cost(node).flops - B * (2 * outputs * 3 * 16 * 16 + outputs)) == 0


def test_attention_flops_with_symbolic_tokens():
    t = sympy.Symbol("tokens", integer=True, positive=True)

    def build(g):
        q = g.add_input("q", TensorType(F32, ("batch", 6, "tokens", 64)))
        return g.op.sdpa(q, q, q)

    scores = B * 6 * t * t
    # q@k^T and p@v are 2*L*S*E each; scale 1 and softmax 5 per score
    assert sympy.simplify(node_cost(single(build)).flops - (2 * scores * 64 * 2 + 6 * scores)) == 0


def test_decomposed_attention_costs_the_same_as_sdpa():
    from graphopt.passes import PassManager
    g = Graph()
    q = g.add_input("q", TensorType(F32, ("batch", 6, 197, 64)))
    g.set_outputs([g.op.sdpa(q, q, q)])
    after, _ = PassManager(["decompose_attention", "constant_folding", "dce"]).run(g)
    ratio = compare(g, after, batch=8)["flops"]["ratio"]
    assert ratio == pytest.approx(1.0)


def test_deit_small_flops_match_the_published_figure(deit_case):
    graph = from_torch(deit_case.model, tuple(deit_case.args), dict(deit_case.kwargs))
    cost = graph_cost(graph)
    assert not cost.unknown
    gmacs = cost.at(batch=1)["flops"] / 2e9
    assert gmacs == pytest.approx(4.6, abs=0.05)  # DeiT-S: 4.6 GFLOPs (multiply-adds) in Touvron et al. 2021


@pytest.mark.parametrize("fixture", ["tiny_vit_case", "deit_case", "deit_distilled_case", "bert_case", "clip_case",
                                     "minilm_case", "digits_case", "gpt2_case", "llava_case"])
def test_parameter_count_matches_the_model(fixture, request):
    case = request.getfixturevalue(fixture)
    graph = from_torch(case.model, tuple(case.args), dict(case.kwargs), dynamic_batch=bool(case.dynamic_batch))
    cost = graph_cost(graph)
    expected = sum(p.numel() for p in case.model.parameters())
    assert cost.parameters == expected
    assert cost.parameter_bytes == 4 * expected
