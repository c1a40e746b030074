"""A batch-1 example (what users have) captures a graph with a symbolic batch that runs at any batch;
a graph captured with a static batch refuses another batch at the call, naming the input."""
import pytest
import torch
import torch.utils._pytree as pytree

import graphopt
from graphopt import zoo


def _first(value):
    return value[:1] if isinstance(value, torch.Tensor) and value.dim() else value


def _batch(value, n, seed):
    """``value`` at batch ``n`` (fresh random rows for floats, fresh ids for integers)."""
    if not isinstance(value, torch.Tensor) or not value.dim():
        return value
    g = torch.Generator().manual_seed(seed)
    if value.dtype.is_floating_point:
        return torch.randn((n, *value.shape[1:]), generator=g, dtype=value.dtype)
    hi = max(int(value.max()) + 1, 2)
    return torch.randint(0 if value.min() == 0 else 1, hi, (n, *value.shape[1:]), generator=g, dtype=value.dtype)


def _assert_close(got, expected, what):
    got = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    expected = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    assert len(got) == len(expected), what
    for g, e in zip(got, expected):
        assert g.shape == e.shape, (what, g.shape, e.shape)
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=what)


@pytest.mark.parametrize("fixture", ["tiny_vit_case", "bert_case", "gpt2_case"])
def test_batch_one_example_runs_at_any_batch(fixture, request):
    case = request.getfixturevalue(fixture)
    args = tuple(_first(a) for a in case.args)
    kwargs = {k: _first(v) for k, v in case.kwargs.items()}
    on_torch = graphopt.optimize(case.model, [], (args, kwargs))
    assert str(on_torch.graph.inputs[0].type.shape[0]) == "batch"
    on_ort = graphopt.optimize(on_torch.graph, [], backend="onnxruntime", backend_options={"threads": 1})
    for n in (1, 3, 8):
        a = tuple(_batch(x, n, seed=n) for x in args)
        k = {name: _batch(v, n, seed=n) for name, v in kwargs.items()}
        if "attention_mask" in k:
            k["attention_mask"] = torch.ones_like(k["attention_mask"])
            k["attention_mask"][-1, -5:] = 0  # the last sequence is padded
        with torch.no_grad():
            expected = case.model(*a, **k)
        for om in (on_torch, on_ort):
            _assert_close(om(*a, **k), expected, f"{case.name} on {om.backend} at batch {n}")


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_static_batch_refuses_another_batch_naming_the_input(backend):
    case = zoo.tiny_vit(batch=1)
    options = {"threads": 1} if backend == "onnxruntime" else {}
    om = graphopt.optimize(case.model, [], case.args, dynamic_batch=False, backend=backend, backend_options=options)
    with pytest.raises(ValueError, match=r"input %x is \(3, 3, 32, 32\) torch.float32, the graph expects "
                                         r"f32\[1,3,32,32\] \(input 0 of 1\): axis 0 must be 1 \(the model was captured with a static"):
        om(torch.randn(3, 3, 32, 32))
    torch.testing.assert_close(om(*case.args), case.run())


def test_inputs_that_share_the_batch_must_agree():
    case = zoo.tiny_vit(batch=1)

    class Two(torch.nn.Module):
        def forward(self, x, y):
            return case.model(x) + y

    om = graphopt.optimize(Two().eval(), [], (case.args[0], torch.zeros(1, 10)))
    with pytest.raises(ValueError, match=r"input %y is \(3, 10\) torch.float32, .* axis 0 \(batch\) is 2 in %x"):
        om(torch.randn(2, 3, 32, 32), torch.zeros(3, 10))
