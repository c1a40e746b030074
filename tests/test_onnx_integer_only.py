"""integer_only on ONNX files written by torch.onnx.export, exact (dynamo) and legacy: every Linear
(written as MatMul(x, Wᵀ) + Add) becomes an int.linear, masked text encoders keep the exporters'
additive mask out of the integer range, the result stays as close to the float model as the torch
capture path's integer tests require, and an impossible rescale names the node and its ranges."""
import contextlib
import io

import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt.frontends import from_onnx
from graphopt.passes.integer_only import float_ops
from graphopt.passes import PassError
from tests.tiny_models import padded_ids, tiny_bert

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) needs it


class LastHidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model(*args).last_hidden_state


def export(model, args, path, dynamo, names):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(LastHidden(model).eval(), args, path, dynamo=dynamo, input_names=names,
                          output_names=["last_hidden_state"])
    return str(path)


def n_linears(model):
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


def text_batch(generator, n=2, length=8):
    ids, mask = padded_ids(generator, n, length)
    mask[0] = 1  # one full row, one padded
    return ids, mask


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=4)
    model = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(2, 3, 16, 16, generator=g),) for _ in range(4)]
    return model, calib, (torch.randn(2, 3, 16, 16, generator=g),)


@pytest.fixture(scope="module")
def bert():
    model = tiny_bert(32, layers=1)
    g = torch.Generator().manual_seed(0)
    return model, [text_batch(g) for _ in range(4)], text_batch(g)


@pytest.mark.parametrize("dynamo", [True, False], ids=["exact_exporter", "legacy_exporter"])
def test_vit_file_converts_every_linear_and_stays_close(vit, dynamo, tmp_path):
    model, calib, (x,) = vit
    path = export(model, calib[0], tmp_path / "vit.onnx", dynamo, ["pixel_values"])
    assert from_onnx(path).op_counts()["linear"] == n_linears(model)  # MatMul(x, Wᵀ) + Add read as linear
    om = graphopt.optimize(path, ["integer_only"], calib[0], calibration=calib)
    counts = om.graph.op_counts()
    assert counts["int.linear"] == n_linears(model) and "linear" not in counts
    assert om.graph.meta["integer_only"]["fallback"] == [] and float_ops(om.graph) == []
    for shiftmax in om.graph.find_nodes("int.shiftmax"):  # the exact exporter's all-zero mask is not added
        assert shiftmax.inputs[0].producer.op == "int.requant" and \
            shiftmax.inputs[0].producer.inputs[0].producer.op == "int.matmul"
    with torch.no_grad():
        ref = model(x).last_hidden_state
    out = om(x)
    out = out[0] if isinstance(out, tuple) else out
    assert F.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99


def test_token_merge_after_integer_only_on_an_exact_exporter_file(vit, tmp_path):
    """The exact exporter writes K^T as reshape(permute(reshape(k))) with the i8 requant after it; the integer
    graph's blocks are found through that too (they were refused: 'run token_merge before integer_only')."""
    from graphopt.backends.registry import lower

    model, calib, (x,) = vit
    path = export(model, calib[0], tmp_path / "vit.onnx", True, ["pixel_values"])
    om = graphopt.optimize(path, ["integer_only", "token_merge:r=2"], calib[0], calibration=calib)
    merge_first = graphopt.optimize(path, ["token_merge:r=2", "integer_only"], calib[0], calibration=calib)
    assert om.graph.op_counts()["int.token_merge"] == 1 and float_ops(om.graph) == []
    with torch.no_grad():
        ref = lower(om.graph, "torch")(x)[0]
        assert ref.shape[1] == 17 - 2
        assert torch.equal(lower(om.graph, "cpu_integer", threads=2)(x)[0], ref)
        assert torch.equal(lower(om.graph, "onnxruntime")(x)[0], ref)
        other = lower(merge_first.graph, "torch")(x)[0]
    assert F.cosine_similarity(ref[:, 0], other[:, 0], dim=-1).min() > 0.99      # the CLS token, either order


@pytest.mark.parametrize("dynamo", [True, False], ids=["exact_exporter", "legacy_exporter"])
def test_masked_bert_file_converts_with_its_mask_in_shiftmax(bert, dynamo, tmp_path):
    model, calib, (ids, mask) = bert
    path = export(model, calib[0], tmp_path / "bert.onnx", dynamo, ["input_ids", "attention_mask"])
    om = graphopt.optimize(path, ["integer_only"], calib[0], calibration=calib)
    counts = om.graph.op_counts()
    assert counts["int.linear"] == n_linears(model) and "linear" not in counts
    assert om.graph.meta["integer_only"]["fallback"] == [] and float_ops(om.graph) == []
    assert all(n.inputs[1] is not None for n in om.graph.find_nodes("int.shiftmax"))  # the padding mask is kept
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    out = om(ids, mask)
    out = out[0] if isinstance(out, tuple) else out
    keep = mask.bool()
    assert F.cosine_similarity(ref[keep], out[keep], dim=-1).min() > 0.98


def test_masked_bert_file_on_cpu_integer_follows_each_calls_mask(bert, tmp_path):
    """The exact exporter reads the mask through ONNX-opaque nodes (a GatherND) that run in ONNX Runtime, outside
    what cpu_integer's replay records: a replay kept the captured call's mask, a silent wrong answer. Now such a
    graph is not replayed, and says why. Same shapes, four masks in turn, each equal to the reference ops."""
    from graphopt.backends.registry import lower

    model, calib, (ids, mask) = bert
    path = export(model, calib[0], tmp_path / "bert.onnx", True, ["input_ids", "attention_mask"])
    om = graphopt.optimize(path, ["integer_only"], calib[0], calibration=calib)
    assert "onnx_opaque" in om.graph.op_counts()
    ex, ref = lower(om.graph, "cpu_integer", threads=2), lower(om.graph, "torch")
    short = torch.zeros_like(mask)
    short[:, :3] = 1
    with torch.no_grad():
        for m in (mask, mask, short, torch.ones_like(mask), mask):
            assert torch.equal(ex.run_flat(ids, m)[0], ref.run_flat(ids, m)[0])
    reasons = set(ex.replay.refused.values())
    assert len(reasons) == 1 and "(ONNX GatherND) runs in ONNX Runtime on values the inputs change" in reasons.pop()


def test_an_impossible_rescale_names_the_node_and_the_ranges(tmp_path):
    """T5 adds its learned position bias to the finfo.min mask before the scores: not a plain
    additive mask, so no integer scale fits; the error says where and why."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
    model = transformers.T5EncoderModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    calib = [text_batch(g) for _ in range(3)]
    path = export(model, calib[0], tmp_path / "t5.onnx", False, ["input_ids", "attention_mask"])
    with pytest.raises(PassError, match=r"%\S+ \((softmax|add)\): no int32-safe dyadic rescale exists for these "
                                        r"ranges \(rescale up to .*calibrated inputs: %\S+ in \[-3\.4\d*e\+38, "):
        graphopt.optimize(path, ["integer_only"], calib[0], calibration=calib)
