"""fuse_gelu: before / expected text for the erf and tanh forms and the check that refuses a
broadcasting constant; then on real model code (GPT-2's tanh GELU, an erf GELU written out by hand)."""
import math

import torch

import graphopt
from graphopt.ir import Graph
from graphopt.ir.rewrite import why_not
from tests.textir import assert_graph, assert_same_numbers, run_pass

ERF = """
graph main(%x: f32[batch,8]) {
  %sqrt2: f32[] = constant(1.4142135)
  %one: f32[] = constant(1.0)
  %half: f32[] = constant(0.5)
  %scaled: f32[batch,8] = div(%x, %sqrt2)
  %e: f32[batch,8] = erf(%scaled)
  %p: f32[batch,8] = add(%e, %one)
  %h: f32[batch,8] = mul(%x, %half)
  %y: f32[batch,8] = mul(%h, %p)
  return %y
}"""

TANH = """
graph main(%x: f32[batch,8]) {
  %half: f32[] = constant(0.5)
  %h: f32[batch,8] = mul(%half, %x)
  %three: f32[] = constant(3.0)
  %cube: f32[batch,8] = pow(%x, %three)
  %k: f32[] = constant(0.044715)
  %c: f32[batch,8] = mul(%cube, %k)
  %a: f32[batch,8] = add(%x, %c)
  %s: f32[] = constant(0.7978846)
  %i: f32[batch,8] = mul(%a, %s)
  %t: f32[batch,8] = tanh(%i)
  %one: f32[] = constant(1.0)
  %p: f32[batch,8] = add(%t, %one)
  %y: f32[batch,8] = mul(%p, %h)
  return %y
}"""


def gelu_text(approximate):
    return f"""
graph main(%x: f32[batch,8]) {{
  %y: f32[batch,8] = gelu(%x, approximate="{approximate}")
  return %y
}}"""


def test_erf_and_tanh_forms_become_one_gelu():
    x = torch.randn(4, 8)
    for before, approximate in [(ERF, "none"), (TANH, "tanh")]:
        after, report = run_pass(before, "fuse_gelu")
        assert_graph(after, gelu_text(approximate))
        assert report.counters == {"fuse_gelu.erf": approximate == "none", "fuse_gelu.tanh": approximate == "tanh"}
        assert_same_numbers(before, after, [x], atol=1e-6)  # the written-out form computes torch's gelu


def test_a_broadcasting_constant_is_refused_with_the_reason():
    """0.5 as a [1,1,1] tensor makes the product 3-d: one gelu(x) would change the output's type."""
    before = ERF.replace("%half: f32[] = constant(0.5)", "%half: f32[1,1,1] = constant([[[0.5]]])").replace(
        "%h: f32[batch,8]", "%h: f32[1,batch,8]").replace("%y: f32[batch,8]", "%y: f32[1,batch,8]")
    after, report = run_pass(before, "fuse_gelu")
    assert_graph(after, before)
    assert report.counters == {"fuse_gelu.erf": 0, "fuse_gelu.tanh": 0}
    assert why_not(Graph.parse(before), "fuse_gelu.erf").endswith(
        "check failed: %y is f32[1,batch,8] but %x is f32[batch,8]: a constant broadcasts or promotes x, "
        "so one gelu(x) would change the result's type")


class ErfGelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        return h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))


def test_erf_gelu_is_folded_and_matches():
    model = ErfGelu().eval()
    x = torch.randn(4, 8)
    om = graphopt.optimize(model, ["fuse_gelu", "dce"], (x,), check=True)
    assert om.graph.op_counts() == {"gelu": 1, "linear": 1}
    assert om.report["fuse_gelu"].counters == {"fuse_gelu.erf": 1, "fuse_gelu.tanh": 0}
    torch.testing.assert_close(om(x), torch.nn.functional.gelu(model.fc(x)), atol=1e-6, rtol=1e-6)


def test_gpt2_tanh_gelu_is_folded(gpt2_case):
    om = graphopt.optimize(gpt2_case.model, ["fuse_gelu", "dce"], (tuple(gpt2_case.args), dict(gpt2_case.kwargs)),
                           check=True)
    layers = gpt2_case.config.n_layer
    assert om.report["fuse_gelu"].counters["fuse_gelu.tanh"] == layers
    assert om.graph.op_counts()["gelu"] == layers and "tanh" not in om.graph.op_counts()
    with torch.no_grad():
        expected = gpt2_case.model(**gpt2_case.kwargs).last_hidden_state
    torch.testing.assert_close(om(**gpt2_case.kwargs).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    assert why_not(om.graph, "fuse_gelu.tanh").startswith("rule fuse_gelu.tanh: no mul node in the graph")


def test_opt_cli_why_not(tmp_path, capsys):
    from graphopt.cli import main
    path = tmp_path / "gelu.onnx"
    torch.onnx.export(ErfGelu().eval(), (torch.randn(2, 8),), str(path), dynamo=True, verbose=False)
    capsys.readouterr()
    assert main([str(path), "--why-not", "fuse_gelu.erf"]) == 0
    assert capsys.readouterr().out.startswith("rule fuse_gelu.erf: matches at 1 node(s)")
    assert main([str(path), "--why-not", "fuse_gelu.tanh"]) == 0
    out = capsys.readouterr().out
    assert "did not match" in out and "the pattern wants tanh" in out
    assert main([str(path), "--why-not", "fuse_gel"]) == 2
    assert "did you mean fuse_gelu.erf" in capsys.readouterr().err
