"""Real models through ONNX: all-MiniLM-L6-v2 (real weights) and the DeiT-S-shaped ViT exported with
torch.onnx.export round-trip through opt-cli and match the original in ONNX Runtime; a file made
by ONNX Runtime's transformer optimizer keeps its fused com.microsoft ops."""
import hashlib
import os
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt.cli import main
from graphopt.frontends import from_onnx

pytestmark = pytest.mark.slow


def export(model, args, kwargs, path, dynamic):
    """torch.onnx.export with the dynamo exporter (the legacy one can freeze attention-mask logic)."""
    names = list(kwargs) if kwargs else ["pixel_values"]
    dynamic_shapes = {k: {axis: torch.export.Dim(dim) for axis, dim in dynamic.items()} for k in names}
    if not kwargs:
        dynamic_shapes = (dynamic_shapes["pixel_values"],)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, tuple(args), kwargs=dict(kwargs) or None, dynamo=True,
                                    dynamic_shapes=dynamic_shapes, input_names=names, verbose=False)
    program.save(str(path))
    return path


@pytest.fixture(scope="session")
def deit_onnx(deit_case, tmp_path_factory):
    c = deit_case
    path = tmp_path_factory.mktemp("deit") / "deit.onnx"
    return c, export(c.model, c.args, c.kwargs, path, {0: "batch"})


@pytest.fixture(scope="session")
def minilm_onnx(minilm_case, tmp_path_factory):
    c = minilm_case
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    return c, export(c.model, c.args, c.kwargs, path, {0: "batch", 1: "sequence"})


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def max_error(a, b):
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()) for x, y in zip(a, b))


def round_trip(tmp_path, path, capsys, *extra):
    out = tmp_path / f"{path.stem}.opt.onnx"
    before = sha(path)
    code = main([str(path), "-o", str(out), "-p", "dce", "-p", "cse", "--check", "--runs", "1", "--warmup", "0",
                 *extra])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert sha(path) == before
    assert "max abs error" in stdout
    onnx.checker.check_model(str(out), full_check=True)
    return out


def test_minilm_round_trips_through_opt_cli(minilm_onnx, tmp_path, capsys):
    c, path = minilm_onnx
    out = round_trip(tmp_path, path, capsys, "--dim", "sequence=12")
    from graphopt.zoo import minilm_tokenizer

    tokenizer = minilm_tokenizer()
    batch = dict(tokenizer(["short", "a much longer sentence that needs padding on the other one", "third one"],
                           padding=True, return_tensors="np"))
    original, optimized = session(path), session(out)
    feeds = {i.name: batch[i.name] for i in original.get_inputs()}
    expected, got = original.run(None, feeds), optimized.run(None, feeds)
    assert [o.name for o in optimized.get_outputs()] == [o.name for o in original.get_outputs()]
    assert max_error(expected, got) <= 1e-4
    with torch.no_grad():
        reference = c.model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    assert max_error([reference.last_hidden_state.numpy()], got[:1]) <= 1e-4


def test_deit_round_trips_through_opt_cli(deit_onnx, tmp_path, capsys):
    c, path = deit_onnx
    out = round_trip(tmp_path, path, capsys, "--dim", "batch=1")
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    expected, got = session(path).run(None, {"pixel_values": x}), session(out).run(None, {"pixel_values": x})
    assert max_error(expected, got) <= 1e-4
    with torch.no_grad():
        reference = c.model(pixel_values=torch.from_numpy(x)).logits.numpy()
    assert max_error([reference], got) <= 1e-4
    graph = from_onnx(str(out))
    assert "onnx_opaque" not in graph.op_counts()
    assert graph.op_counts()["isnan"] == 12                     # the exporter's NaN guard after each softmax


def test_deit_onnx_token_merge_matches_the_torch_capture(deit_onnx):
    # the exporter's where(isnan(softmax), 0, softmax) once kept its old token count (an opaque IsNaN), so
    # token_merge failed on the file while it worked on the same model from torch
    c, path = deit_onnx
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    from_file = graphopt.optimize(str(path), ["token_merge:r=8"], progress=False)
    from_torch = graphopt.optimize(c.model, ["token_merge:r=8"], (tuple(c.args), dict(c.kwargs)), progress=False)
    with torch.no_grad():
        expected = from_torch(pixel_values=x).logits
        got = from_file(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert "blocks_merged=12" in str(from_file.report)
    assert (got - expected).abs().max().item() <= 1e-3


def test_deit_from_torch_through_onnxruntime_backend(deit_onnx, tmp_path):
    c, _ = deit_onnx
    om = graphopt.optimize(c.model, ["dce"], (tuple(c.args), dict(c.kwargs)), backend="onnxruntime")
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected = c.model(pixel_values=x).logits
    assert (om(pixel_values=x).logits - expected).abs().max().item() <= 1e-4
    onnx.checker.check_model(om.executable.model, full_check=True)
    om.save(str(tmp_path / "deit_from_torch.onnx"))
    assert os.path.getsize(tmp_path / "deit_from_torch.onnx") > 80e6


def test_transformer_optimizer_output_keeps_fused_ops(minilm_onnx, tmp_path, capsys):
    from onnxruntime.transformers.optimizer import optimize_model

    from graphopt.zoo import minilm

    c, _ = minilm_onnx
    fused_path = tmp_path / "minilm_fused.onnx"
    # eager attention: the optimizer's Attention fusion matches the TorchScript exporter's eager pattern
    model = minilm(attn_implementation="eager").model

    class Positional(torch.nn.Module):  # the fusions match the TorchScript exporter's patterns
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, token_type_ids, attention_mask):
            out = self.model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
            return out.last_hidden_state, out.pooler_output

    names = ["input_ids", "token_type_ids", "attention_mask"]
    legacy = tmp_path / "minilm_legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Positional(model), tuple(c.kwargs[n] for n in names), str(legacy), dynamo=False,
                          opset_version=17, input_names=names, output_names=["last_hidden_state", "pooler_output"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})
    optimize_model(str(legacy), model_type="bert", num_heads=model.config.num_attention_heads,
                   hidden_size=model.config.hidden_size).save_model_to_file(str(fused_path))
    fused = onnx.load(str(fused_path))
    fused_ops = Counter((n.domain, n.op_type) for n in fused.graph.node if n.domain == "com.microsoft")
    assert {op for _, op in fused_ops} >= {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization"}

    out = round_trip(tmp_path, fused_path, capsys)
    written = onnx.load(str(out))
    assert Counter((n.domain, n.op_type) for n in written.graph.node if n.domain == "com.microsoft") == fused_ops
    by_name = {n.name: n for n in written.graph.node}
    for node in fused.graph.node:
        if node.domain == "com.microsoft":
            assert list(by_name[node.name].attribute) == list(node.attribute)
    feeds = {n: c.kwargs[n].numpy() for n in names}
    assert max_error(session(fused_path).run(None, feeds), session(out).run(None, feeds)) <= 1e-4
    # the IR runs the fused ops too (one-node onnxruntime sessions as their reference)
    graph = from_onnx(str(fused_path))
    from graphopt.backends.torch_backend import run

    ref = run(graph, *[torch.from_numpy(feeds[v.name]) for v in graph.inputs])
    assert max_error(session(fused_path).run(None, feeds), [r.numpy() for r in ref]) <= 1e-4
