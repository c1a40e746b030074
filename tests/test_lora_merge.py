"""lora_merge: PEFT-style adapters (written here, no PEFT dependency) from both frontends."""
import io

import pytest
import torch

from graphopt.backends.torch_backend import run
from graphopt.frontends import from_torch
from graphopt.ir import verify
from graphopt.passes import PassManager


class LoraLinear(torch.nn.Module):
    """What peft.tuners.lora.Linear computes: base(x) + lora_B(lora_A(dropout(x))) * (alpha / r)."""

    def __init__(self, n, m, r, alpha=16, bias=True):
        super().__init__()
        self.base_layer = torch.nn.Linear(n, m, bias=bias)
        self.lora_A = torch.nn.Linear(n, r, bias=False)
        self.lora_B = torch.nn.Linear(r, m, bias=False)
        self.lora_dropout = torch.nn.Dropout(0.1)
        self.scaling = alpha / r
        torch.nn.init.normal_(self.lora_B.weight)  # PEFT starts B at zero; a trained adapter is not

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = LoraLinear(16, 32, 4)
        self.fc = LoraLinear(32, 8, 2, alpha=4, bias=False)
        self.plain = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.plain(self.fc(torch.relu(self.q(x))))


def _merge(graph):
    out, report = PassManager(["lora_merge"]).run(graph)
    verify(out)
    return out, report["lora_merge"]


def _no_adapters(graph):
    names = [v.name for v in graph.constants.values()]
    assert not any("lora" in n.lower() for n in names), names
    assert graph.op_counts().get("mul", 0) == 0


def test_merge_torch_frontend_equals_unmerged_and_removes_adapters():
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(3, 5, 16)
    g = from_torch(model, (x,))
    out, rec = _merge(g)
    assert rec.counters["merged"] == 2
    assert out.op_counts() == {"linear": 3, "relu": 1}
    _no_adapters(out)
    xs = torch.randn(4, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(run(out, xs)[0], model(xs), atol=1e-5, rtol=1e-5)
        # independent reference: the merged weight is W + scale * B A
        q = model.q
        expected = q.base_layer.weight + q.scaling * q.lora_B.weight @ q.lora_A.weight
    merged = [n for n in out.nodes if n.op == "linear"][0].inputs[1].const
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-6)


def test_merge_onnx_frontend_equals_unmerged():
    from graphopt.frontends import from_onnx
    torch.manual_seed(1)
    model = Model().eval()
    x = torch.randn(3, 5, 16)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, input_names=["x"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    g = from_onnx(buf.getvalue())
    assert g.op_counts()["linear"] == 7  # the exporter's MatMul(x, Wᵀ) (+ Add) is read as linear
    out, rec = _merge(g)
    assert rec.counters["merged"] == 2
    assert out.op_counts()["linear"] == 3 and "mul" not in out.op_counts()
    with torch.no_grad():
        torch.testing.assert_close(run(out, x)[0], model(x), atol=1e-5, rtol=1e-5)


def test_stacked_adapters_and_scale_before_b():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = torch.nn.Linear(8, 8)
            self.a1, self.b1 = torch.nn.Linear(8, 2, bias=False), torch.nn.Linear(2, 8, bias=False)
            self.a2, self.b2 = torch.nn.Linear(8, 3, bias=False), torch.nn.Linear(3, 8, bias=False)

        def forward(self, x):
            y = self.base(x) + self.b1(self.a1(x) * 0.5)
            return y + self.b2(self.a2(x)) / 4.0

    torch.manual_seed(2)
    model = Two().eval()
    x = torch.randn(2, 8)
    out, rec = _merge(from_torch(model, (x,)))
    assert rec.counters["merged"] == 2 and out.op_counts() == {"linear": 1}
    with torch.no_grad():
        torch.testing.assert_close(run(out, x)[0], model(x), atol=1e-5, rtol=1e-5)


def test_adapter_whose_intermediate_is_used_elsewhere_is_kept():
    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2, bias=False), torch.nn.Linear(2, 8, bias=False)

        def forward(self, x):
            h = self.a(x)
            return self.base(x) + self.b(h) * 2.0, h

    torch.manual_seed(3)
    g = from_torch(Leaky().eval(), (torch.randn(2, 8),))
    out, rec = _merge(g)
    assert rec.counters["merged"] == 0
    assert out.op_counts() == g.op_counts()
    assert any("no LoRA adapter found" in n for n in rec.notes)


def test_adapter_on_another_input_is_not_merged():
    class Cross(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2, bias=False), torch.nn.Linear(2, 8, bias=False)

        def forward(self, x, z):
            return self.base(x) + self.b(self.a(z)) * 2.0

    g = from_torch(Cross().eval(), (torch.randn(2, 8), torch.randn(2, 8)))
    out, rec = _merge(g)
    assert rec.counters["merged"] == 0
