"""The demo's machinery (graphopt.demo.run) on a tiny ViT instead of the trained digits model: every
variant is measured, the integer model is identical on both backends, and the report is written."""
import shutil
from types import SimpleNamespace

import onnx
import pytest
import torch

from graphopt import demo


@pytest.fixture(scope="module")
def tiny_case():
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=128, image_size=32, patch_size=4,
                                                num_labels=10)).eval()
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(64, 3, 32, 32, generator=g), torch.randn(24, 3, 32, 32, generator=g)
    with torch.no_grad():
        labels = model(test).logits.argmax(-1)  # the float model is right by construction: accuracy 1

    def accuracy(fn):
        with torch.no_grad():
            out = fn(test)
        return (getattr(out, "logits", out).argmax(-1) == labels).float().mean().item()

    return SimpleNamespace(model=model, train_images=train, test_images=test, test_labels=labels, accuracy=accuracy)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="cpu_integer needs a C compiler")
def test_demo_measures_every_variant_and_writes_the_report(tiny_case, tmp_path):
    result = demo.run(tiny_case, tmp_path, batch=8, rounds=1, threads=1, pipeline=["token_merge:r=4", "integer_only"],
                      token_merge_rs=(0, 4), low_rank_kept=(1.0, 0.9))
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["float, torch eager", "float, ONNX Runtime", "ONNX Runtime int8 (quantize_dynamic)",
                          "graphopt, ONNX Runtime", "graphopt, cpu_integer"]
    assert rows["float, torch eager"]["accuracy"] == 1.0
    assert rows["float, ONNX Runtime"]["agrees with float"] >= 23 / 24  # fp32 in another runtime: at most a tie flips
    assert result["identical"]  # the same integer graph, bit for bit, on both backends
    assert rows["graphopt, cpu_integer"]["accuracy"] == rows["graphopt, ONNX Runtime"]["accuracy"]
    assert all(r["ms per batch of 8"] > 0 for r in rows.values())
    # the r=0 point of the token-merge curve and the 100% point of the low-rank curve are the float model
    assert [p[2] for p in result["token_merge_curve"]] == ["r=0", "r=4"] and result["token_merge_curve"][0][1] == 1.0
    assert result["low_rank_curve"][0][1] == 1.0
    page = open(result["report_path"]).read()
    for section in ("table-accuracy-and-speed-side-by-side", "trade-offs", "graph", "files"):
        assert f'<section id="{section}"' in page
    model = onnx.load(result["onnx_path"])
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulInteger" in ops or "ConvInteger" in ops or "QLinearMatMul" in ops, sorted(ops)
