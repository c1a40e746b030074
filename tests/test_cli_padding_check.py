"""opt-cli --check after zero_padded_positions: the outputs are compared at the real positions of the
attention mask only, since the pass sets the padded ones to 0 on purpose; the errors it reports are the
ones computed here from both models run in ONNX Runtime."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from graphopt.cli import main

transformers = pytest.importorskip("transformers")


def _bert_onnx(path):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    feed = (torch.ones(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long))
    torch.onnx.export(model, feed, str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], dynamo=True,
                      dynamic_shapes=({0: "batch", 1: "tokens"}, {0: "batch", 1: "tokens"}))
    return path


def _padded(lengths, tokens=16):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (len(lengths), tokens)).astype(np.int64)
    mask = (np.arange(tokens)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def test_check_compares_only_the_real_positions_of_the_mask(tmp_path, capsys):
    model = _bert_onnx(tmp_path / "bert.onnx")
    feed = _padded([16, 7, 2])
    np.savez(tmp_path / "calib.npz", **{k: v[None] for k, v in feed.items()})
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main([str(model), "-o", str(out), "-p", "zero_padded_positions", "--calib", str(tmp_path / "calib.npz"),
                 "--check", "--runs", "1", "--warmup", "0", "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    check = json.loads(report.read_text())["check"]
    before = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    after = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    keep = feed["attention_mask"] != 0
    assert bool((after[~keep] == 0).all()) and bool((before[~keep] != 0).any())
    real_error = float(np.abs(before[keep].astype(np.float64) - after[keep]).max())
    hidden = check["outputs"]["last_hidden_state"]
    assert hidden["max_abs_error"] == pytest.approx(real_error, rel=1e-6, abs=1e-7)
    assert "25 real positions of 'attention_mask'" in hidden["compared"] and "23 padded" in hidden["compared"]
    a, b = before[keep].astype(np.float64).ravel(), after[keep].astype(np.float64).ravel()
    assert check["cosine"] == pytest.approx(a @ b / np.sqrt((a @ a) * (b @ b)), rel=1e-9)
