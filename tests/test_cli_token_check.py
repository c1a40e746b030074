"""opt-cli --check after a token pass: outputs that keep their shape are compared whole, the token axis
only on the leading tokens the pass keeps in place (CLS), and the report says why the rest is not
comparable; the JSON report stays standard JSON; the HTML report carries the cost figures and a drawing."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from graphopt.cli import main

transformers = pytest.importorskip("transformers")


def _vit_onnx(path, pooled: bool):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=4)
    torch.manual_seed(0)
    model = transformers.ViTModel(config, add_pooling_layer=pooled).eval()
    outputs = ["last_hidden_state", "pooler_output"] if pooled else ["last_hidden_state"]
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), input_names=["pixel_values"],
                      output_names=outputs, dynamic_axes={"pixel_values": {0: "batch"}}, dynamo=False)
    return path


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_check_after_token_merge_compares_the_cls_token_and_the_pooled_output(tmp_path, capsys):
    model = _vit_onnx(tmp_path / "vit.onnx", pooled=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", pixel_values=x[None])
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main([str(model), "-o", str(out), "-p", "token_merge:r=4", "--calib", str(tmp_path / "calib.npz"),
                 "--check", "--runs", "1", "--warmup", "0", "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    check = _strict_json(report)["check"]
    before = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})
    after = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})
    assert after[0].shape[1] < before[0].shape[1]  # tokens were merged
    cls_error = float(np.abs(before[0][:, :1].astype(np.float64) - after[0][:, :1]).max())
    pooled_error = float(np.abs(before[1].astype(np.float64) - after[1]).max())
    hidden, pooled = check["outputs"]["last_hidden_state"], check["outputs"]["pooler_output"]
    assert hidden["max_abs_error"] == pytest.approx(cls_error, rel=1e-6, abs=1e-7)
    assert "1 leading token(s) kept in place" in hidden["compared"]
    assert pooled["max_abs_error"] == pytest.approx(pooled_error, rel=1e-6, abs=1e-7) and "compared" not in pooled
    assert check["max_abs_error"] == pytest.approx(max(cls_error, pooled_error), rel=1e-6)


def test_check_with_nothing_comparable_fails_and_says_why(tmp_path, capsys):
    model = _vit_onnx(tmp_path / "vit.onnx", pooled=False)
    out = tmp_path / "out.onnx"
    code = main([str(model), "-o", str(out), "-p", "token_merge:r=4,protect=0", "--check", "--runs", "1",
                 "--warmup", "0", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "no output can be compared" in err and "no leading special token" in err
    assert not out.exists()


def test_html_report_has_the_cost_figures_and_a_block_drawing(tmp_path, capsys):
    model = _vit_onnx(tmp_path / "vit.onnx", pooled=True)
    page = tmp_path / "report.html"
    assert main([str(model), "-p", "token_merge:r=4", "--report", str(page), "-q"]) == 0, capsys.readouterr().err
    text = page.read_text()
    assert "Cost before and after" in text and "One block before and after" in text and "<img" in text
