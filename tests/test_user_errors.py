"""The mistakes and edges a new user meets first: each error names the thing and what to do, and
the cases that should work do, against the original model."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import graphopt
from graphopt.cli import main
from graphopt.frontends import from_torch
from graphopt.passes import PassConfigError, PassError, make_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32, bias=False)
        self.fc2 = torch.nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.fixture(scope="module")
def stack():
    torch.manual_seed(0)
    model = Stack().eval()
    x = torch.randn(2, 5, 16)
    return model, x, from_torch(model, (x,), {})


# ---- optimize() arguments ----------------------------------------------------------------------
def test_calibration_with_a_wrong_key_names_the_expected_and_given_inputs(stack):
    model, x, graph = stack
    with pytest.raises(ValueError) as e:
        graphopt.optimize(graph, ["dce"], (x,), calibration=[{"pixel_values": x}])
    message = str(e.value)
    assert "1 positional" in message and "'pixel_values'" in message and "TreeSpec" not in message


def test_a_single_pass_name_is_one_pass(stack):
    model, x, graph = stack
    om = graphopt.optimize(graph, "cse", (x,))
    assert [r.name for r in om.report.passes] == ["cse"]
    torch.testing.assert_close(om(x), model(x))
    with pytest.raises(PassConfigError, match="give several passes as a list"):
        graphopt.optimize(graph, "dce,cse", (x,))


def test_a_non_onnx_path_says_what_a_path_must_be():
    with pytest.raises(TypeError) as e:
        graphopt.optimize("model.pt")
    assert ".onnx" in str(e.value) and "graphopt.load_graph" in str(e.value)


@pytest.mark.parametrize("name", ["out.graph", "out.onnx"])
def test_saving_into_a_missing_folder_names_the_folder(stack, tmp_path, name):
    model, x, graph = stack
    om = graphopt.optimize(graph, [], (x,))
    target = tmp_path / "missing" / name
    with pytest.raises(FileNotFoundError) as e:
        om.save(str(target))
    assert str(tmp_path / "missing") in str(e.value) and ".tmp" not in str(e.value)
    assert not (tmp_path / "missing").exists()


def test_optimized_model_is_a_module_without_parameters(stack):
    model, x, graph = stack
    om = graphopt.optimize(graph, ["cse"], (x,))
    assert isinstance(om, torch.nn.Module)
    assert list(om.parameters()) == [] and not om.training
    wrapped = torch.nn.Sequential(om, torch.nn.ReLU())  # drops into code that expects a module
    torch.testing.assert_close(wrapped(x), torch.relu(model(x)))


# ---- pass options ------------------------------------------------------------------------------
def test_mapping_and_list_options_parse_from_strings():
    spec = make_spec("low_rank:ranks={blocks.0.fc1:4,re:blocks\\.1\\..*:8},layers=[blocks.*],method=svd")
    assert spec.options["ranks"] == {"blocks.0.fc1": 4, "re:blocks\\.1\\..*": 8}
    assert spec.options["layers"] == ["blocks.*"] and spec.options["method"] == "svd"
    assert make_spec('low_rank:ranks={"a": 2}').options["ranks"] == {"a": 2}
    for bad, why in [("low_rank:ranks={a:4", "must be a mapping"), ("low_rank:ranks={a}", "'a' is not key:value"),
                     ("low_rank:ranks=3", "must be a mapping"), ("low_rank:layers=[a,b", "unclosed")]:
        with pytest.raises(PassConfigError, match="option ranks|option layers") as e:
            make_spec(bad)
        assert why in str(e.value)


def test_token_merge_r_too_large_names_the_token_count(tiny_vit_case):
    case = tiny_vit_case
    tokens = 1 + (32 // 4) ** 2  # CLS + 8x8 patches of the zoo's tiny ViT
    with pytest.raises(PassError, match=f"r=500 is too large for {tokens} tokens .*at most {(tokens - 1) // 2}"):
        graphopt.optimize(case.model, ["token_merge:r=500"], case.args)


def test_cpu_integer_refuses_a_float_graph_and_reports_what_it_lowered(stack):
    from graphopt.backends.cpu_integer import lower_to_kernels
    from graphopt.backends import LoweringError
    from graphopt.ir import Graph, TensorType

    model, x, graph = stack
    with pytest.raises(LoweringError, match="no integer ops.*integer_only"):
        graphopt.optimize(graph, [], (x,), backend="cpu_integer")

    i32 = torch.int32
    g = Graph("mixed")  # an integer add feeding a float op: a legitimate mixed graph
    a, b = g.add_input("a", TensorType(i32, (3, 16))), g.add_input("b", TensorType(i32, (3, 16)))
    ma, mb = g.add_constant(torch.full((16,), 5, dtype=i32)), g.add_constant(torch.tensor(7, dtype=i32))
    c = g.add_constant(torch.tensor(3, dtype=i32))
    y = g.call("int.add", a, b, ma, mb, c, pa=0, pb=0, k=4, lo=-32768, hi=32767, zero_point=0, dtype="i32")
    g.set_outputs([g.op.relu(g.op.cast(y, dtype=torch.float32))])
    lowered, report = lower_to_kernels(g, threads=1)
    assert [e.kernel for e in report] == ["cpu.int_add"] and report[0][0] == "cpu.int_add"
    assert str(report).startswith("cpu_integer: 1 kernel(s): cpu.int_add x1")


# ---- the CLI -------------------------------------------------------------------------------------
def test_cli_unknown_pass_points_at_list_passes(capsys):
    assert main(["--demo", "-p", "tome:r=8"]) == 2
    err = capsys.readouterr().err
    assert "unknown pass 'tome'" in err and "did you mean 'token_merge'" in err
    assert "opt-cli --list-passes" in err and "graphopt.list_passes" not in err


def test_cli_help_has_examples_and_a_version(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and 'opt-cli model.onnx -o out.onnx -p "token_merge:r=8"' in out
    assert "{key:value,key2:value2}" in out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert graphopt.__version__ in capsys.readouterr().out


def test_list_passes_shows_whole_first_paragraphs(capsys, monkeypatch):
    from graphopt.passes import get_pass, list_passes

    monkeypatch.setenv("COLUMNS", "1000")
    assert main(["--list-passes"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in list_passes():
        paragraph = " ".join(get_pass(name).description.split("\n\n")[0].split())
        assert paragraph in out, name


def test_no_example_names_the_old_tome_pass():
    """Only the sources: build/ and dist/ copies and caches are not the project's text."""
    skipped = {".git", "__pycache__", "build", "dist", ".venv", ".pytest_cache"}
    stale = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in skipped and not d.endswith(".egg-info")]
        for f in files:
            if f.endswith((".py", ".md")) and f != "test_user_errors.py":
                with open(os.path.join(folder, f), encoding="utf-8") as handle:
                    if '"tome:' in handle.read():
                        stale.append(os.path.relpath(os.path.join(folder, f), ROOT))
    assert stale == []


def test_cli_dict_option_runs_and_a_malformed_one_is_named(tmp_path, capsys):
    onnx_path = _export(Stack, tmp_path, dynamo=True)
    out = tmp_path / "out.onnx"
    assert main([onnx_path, "-o", str(out), "-q", "-p", "low_rank:ranks={blocks.1.fc1:4},method=svd"]) == 0
    assert out.exists()
    assert main([onnx_path, "-o", str(tmp_path / "bad.onnx"), "-p", "low_rank:ranks={blocks.1.fc1}"]) == 2
    err = capsys.readouterr().err
    assert "option ranks" in err and "not key:value" in err and "AttributeError" not in err


# ---- ONNX imports ----------------------------------------------------------------------------------
def _export(cls, folder, dynamo):
    torch.manual_seed(0)
    model = cls().eval()
    path = str(folder / f"model_{'dynamo' if dynamo else 'legacy'}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 5, 16),), path, dynamo=dynamo, input_names=["x"])
    return path


def test_layer_patterns_match_module_paths_of_a_dynamo_export(tmp_path):
    from graphopt.frontends import from_onnx
    from graphopt.passes.low_rank_layers import find_layers

    path = _export(Stack, tmp_path, dynamo=True)
    assert sorted(l.name for l in find_layers(from_onnx(path))) == [
        "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    torch.manual_seed(0)
    model = Stack().eval()
    om = graphopt.optimize(path, ["low_rank:layers=blocks.1.fc1,ratio=0.25,method=svd"])
    factored = {n.meta["low_rank"]["layer"] for n in om.graph.nodes if "low_rank" in n.meta}
    assert factored == {"blocks.1.fc1"}
    # the factors are the best rank-r approximation of exactly that module's weight (Eckart-Young)
    a, b = (n for n in om.graph.nodes if "low_rank" in n.meta)
    rank = a.meta["low_rank"]["rank"]
    assert 0 < rank < 16
    u, s, vh = torch.linalg.svd(model.blocks[1].fc1.weight.detach())
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    torch.testing.assert_close(_weight(b) @ _weight(a), best, atol=1e-5, rtol=1e-4)


def _weight(node):
    w = node.inputs[1].const
    return w if node.op == "linear" else w.t()


def test_legacy_siglip_export_imports_and_matches(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    path = str(tmp_path / "siglip.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["pixel_values"], opset_version=17)
    om = graphopt.optimize(path, ["cse"])  # its attention-pooling head computes axes with Mod and Transposes by them
    got = om(x)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(got[0], ref.last_hidden_state, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], ref.pooler_output, atol=1e-5, rtol=1e-4)
