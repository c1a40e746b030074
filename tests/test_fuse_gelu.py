"""fuse_gelu on real model code: GPT-2's tanh GELU and an erf GELU written out by hand."""
import math

import torch

import graphopt
from graphopt.ir.rewrite import why_not


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
