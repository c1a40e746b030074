"""A compiled model is a pure function: calling it again gives the same answer. In-place ATen ops
(``add_``, ``fill_`` on a view) are functionalized at capture, so no pass can fold a tensor that an op
later writes to into a stored constant (results then drifted from call to call)."""
import pytest
import torch
import torch.utils._pytree as pytree

import graphopt
from graphopt.backends.registry import lower
from graphopt.frontends import from_torch
from graphopt.ir import Graph, OpError, TensorType
from graphopt.ir.ops.opaque import TensorArg
from graphopt.passes import PassManager

PASSES = ["constant_folding", "cse", "dce", "decompose_attention", "fuse_gelu"]


class InPlaceOnALocal(torch.nn.Module):
    def forward(self, x):
        b = torch.arange(4.0)
        b.add_(1.0)
        return x + b


class InPlaceOnAView(torch.nn.Module):
    def forward(self, x):
        c = x.clone()
        c[:, 0] = 5.0  # fill_ on a select view of c
        return c * 2


def _leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _assert_same(got, expected, what, atol=0.0):
    got, expected = _leaves(got), _leaves(expected)
    assert len(got) == len(expected), what
    for g, e in zip(got, expected):
        assert g.shape == e.shape, (what, g.shape, e.shape)
        if atol == 0.0:
            assert torch.equal(g, e), f"{what}: max abs difference {(g.double() - e.double()).abs().max().item():.3g}"
        else:
            scale = max(e.abs().max().item(), 1.0)
            assert (g.double() - e.double()).abs().max().item() <= atol * scale, what


def test_in_place_add_on_a_local_gives_the_same_answer_every_call():
    x = torch.zeros(2, 4)
    om = graphopt.optimize(InPlaceOnALocal(), ["constant_folding", "cse", "dce"], (x,))
    for _ in range(3):
        assert om(x).tolist() == [[1.0, 2.0, 3.0, 4.0]] * 2  # arange(4) + 1, by hand


def test_in_place_write_into_a_view_reaches_the_base_tensor():
    x = torch.arange(6.0).reshape(2, 3)
    om = graphopt.optimize(InPlaceOnAView(), ["constant_folding", "cse", "dce"], (x,))
    for _ in range(2):
        assert om(x).tolist() == [[10.0, 2.0, 4.0], [10.0, 8.0, 10.0]]
    assert x.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]  # the input is untouched


def test_the_ir_refuses_an_in_place_opaque_node():
    g = Graph("mutating")
    x = g.add_input("x", TensorType(torch.float32, (4,)))
    with pytest.raises(OpError, match=r"aten::add_\.Tensor writes to its inputs in place"):
        g.create_node("opaque", [x], {"target": "aten::add_.Tensor", "args": (TensorArg(0), 1.0), "kwargs": {},
                                      "out_types": (TensorType(torch.float32, (4,)),)})


def test_t5_encoder_gives_the_same_answer_on_its_second_call():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
    model = transformers.T5EncoderModel(config).eval()
    ids = torch.randint(0, 99, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    om = graphopt.optimize(model, ["constant_folding", "cse", "dce"], {"input_ids": ids})
    for _ in range(2):
        _assert_same(om(input_ids=ids).last_hidden_state, expected, "t5 encoder", atol=1e-5)


ZOO = ["tiny_vit_case", "bert_case", "clip_case", "gpt2_case"]  # the cheap ones


@pytest.mark.parametrize("fixture", ZOO)
def test_zoo_models_answer_the_same_on_every_call_after_every_pass(fixture, request):
    case = request.getfixturevalue(fixture)
    expected = case.run()
    graph = from_torch(case.model, tuple(case.args), dict(case.kwargs), dynamic_batch=bool(case.dynamic_batch))
    for name in PASSES:
        graph, _ = PassManager([name]).run(graph)
        executable = lower(graph, "torch")
        with torch.no_grad():
            first = executable(*case.args, **case.kwargs)
            _assert_same(first, expected, f"{case.name} after {name}", atol=1e-4)
            for _ in range(2):
                _assert_same(executable(*case.args, **case.kwargs), first, f"{case.name} after {name}, again")
