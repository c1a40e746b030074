"""torch.export frontend + reference backend: every fixture round-trips through optimize()."""
import pytest
import torch
import torch.utils._pytree as pytree

import graphopt
from graphopt.frontends import ExportError, from_torch
from graphopt.passes import PassManager
from graphopt.pipeline import _flat_tensors

FIXTURES = ["tiny_vit_case", "deit_case", "deit_distilled_case", "bert_case", "clip_case", "minilm_case", "digits_case",
            "gpt2_case", "llava_case"]
CLEANUP = ["constant_folding", "cse", "dce", "decompose_attention"]


def grow_batch(value):
    """Batch 2 -> 3 by repeating the first row, to exercise the symbolic batch dim."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        return torch.cat([value, value[:1]])
    return value


def assert_same_outputs(expected, actual, atol=1e-5):
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    act_leaves, act_spec = pytree.tree_flatten(actual)
    assert type(actual) is type(expected)
    assert act_spec == exp_spec
    for e, a in zip(exp_leaves, act_leaves):
        if isinstance(e, torch.Tensor):
            assert a.shape == e.shape and a.dtype == e.dtype
            assert (a.double() - e.double()).abs().max().item() <= atol
        else:
            assert a == e


@pytest.mark.parametrize("fixture", FIXTURES)
def test_fixture_round_trips_through_optimize(fixture, request):
    case = request.getfixturevalue(fixture)
    dynamic = bool(case.dynamic_batch)
    om = graphopt.optimize(case.model, [], (tuple(case.args), dict(case.kwargs)), dynamic_batch=dynamic)
    grow = grow_batch if dynamic else (lambda v: v)  # a model that fixes its batch is checked at that batch
    args = [grow(a) for a in case.args]
    kwargs = {k: grow(v) for k, v in case.kwargs.items()}
    with torch.no_grad():
        expected = case.model(*args, **kwargs)
    assert_same_outputs(expected, om(*args, **kwargs))
    assert ("batch" in str(om.graph).splitlines()[0]) == dynamic


@pytest.mark.parametrize("fixture", FIXTURES)
def test_fixture_round_trips_through_each_cleanup_pass(fixture, request):
    case = request.getfixturevalue(fixture)
    graph = from_torch(case.model, tuple(case.args), dict(case.kwargs), dynamic_batch=bool(case.dynamic_batch))
    flat = _flat_tensors(graph, tuple(case.args), dict(case.kwargs))
    for passes in [[p] for p in CLEANUP] + [CLEANUP]:
        out, report = PassManager(passes, example_inputs=flat, check=True).run(graph)
        optimized = graphopt.OptimizedModel(out, report, "torch")
        with torch.no_grad():
            expected = case.model(*case.args, **case.kwargs)
        assert_same_outputs(expected, optimized(*case.args, **case.kwargs))
    assert "sdpa" not in out.op_counts()


def test_eval_mode_no_ops_disappear_and_unknown_ops_stay_opaque():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 6)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x):
            return torch.cumsum(self.drop(self.fc(x)), dim=-1).contiguous().clone()

    model = Model().eval()
    x = torch.randn(4, 6)
    graph = from_torch(model, (x,))
    assert graph.op_counts() == {"linear": 1, "opaque": 1}
    opaque = graph.find_nodes("opaque")[0]
    assert opaque.attrs["target"] == "aten::cumsum"
    assert opaque.meta["module"] == ""
    om = graphopt.optimize(model, [], (x,))
    y = torch.randn(7, 6)
    torch.testing.assert_close(om(y), model(y), atol=1e-6, rtol=0)


def test_a_nan_guard_is_an_isnan_op_not_opaque():
    # token passes re-infer the types of every op after a changed token count; an opaque node cannot follow them
    class Guard(torch.nn.Module):
        def forward(self, x):
            p = torch.softmax(x, dim=-1)
            return torch.where(torch.isnan(p), torch.zeros_like(p), p)

    x = torch.randn(2, 5, 5)
    graph = from_torch(Guard(), (x,))
    assert graph.op_counts().get("isnan") == 1 and "opaque" not in graph.op_counts()
    y = x.clone()
    y[0, 1] = float("-inf")                      # a fully masked row: softmax gives NaN there, the guard 0
    om = graphopt.optimize(Guard(), [], (x,))
    torch.testing.assert_close(om(y), Guard()(y), atol=1e-6, rtol=0)
    assert om(y)[0, 1].eq(0).all()


@pytest.mark.parametrize("padding,kernel,dilation,imports", [("valid", 4, 1, True), ("same", 3, 1, True),
                                                            ("same", 3, 2, True), ("same", 2, 1, False)])
def test_conv2d_with_a_padding_string(padding, kernel, dilation, imports):
    """nn.Conv2d(padding="valid" / "same") exports as aten.conv2d.padding (SigLIP's patch embedding): a conv2d with
    the numeric padding, unless "same" would pad one side more (then opaque, with the reason)."""
    stride = kernel if padding == "valid" else 1
    model = torch.nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation).eval()
    x = torch.randn(2, 3, 12, 12)
    graph = from_torch(model, (x,))
    assert graph.op_counts() == ({"conv2d": 1} if imports else {"opaque": 1})
    if not imports:
        assert "pads unevenly" in graph.find_nodes("opaque")[0].meta["opaque_reason"]
    torch.testing.assert_close(graphopt.optimize(model, [], (x,))(x), model(x), atol=1e-5, rtol=0)


def test_node_meta_records_the_source_module():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.GELU()).eval()
    graph = from_torch(model, (torch.randn(2, 3),))
    assert [(n.op, n.meta["module"]) for n in graph.nodes] == [("linear", "0"), ("gelu", "1")]


def test_export_failure_names_the_module():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
                return x * 2
            return x

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 4), DataDependent())

        def forward(self, x):
            return self.encoder(x)

    with pytest.raises(ExportError, match=r"torch.export failed in module encoder.1 \(DataDependent"):
        from_torch(Outer().eval(), (torch.randn(2, 4),))


def test_empty_batch_gets_a_clear_error():
    with pytest.raises(ExportError, match="empty batch"):
        from_torch(torch.nn.Linear(3, 3), (torch.randn(0, 3),))


def test_wrong_call_structure_is_reported():
    model = torch.nn.Linear(3, 3).eval()
    om = graphopt.optimize(model, [], (torch.randn(2, 3),))
    with pytest.raises(TypeError, match=r"captured with 1 positional input\(s\), got 2 positional input\(s\)"):
        om(torch.randn(2, 3), torch.randn(2, 3))
