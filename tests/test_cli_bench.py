"""The benchmark harness runs end to end (tiny model, few runs) and writes its JSON and table."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_harness_runs_baselines_and_pipelines(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--model", "tiny_vit", "--batch", "2",
                           "--runs", "2", "--warmup", "0", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    names = [r["name"] for r in result["runners"]]
    assert names[:3] == ["torch eager", "onnxruntime fp32", "onnxruntime int8 (quantize_dynamic)"]
    assert "graphopt cleanup -> ort" in names
    assert result["baseline"] == "torch eager"
    by_name = {r["name"]: r for r in result["runners"]}
    for name in ("torch eager", "onnxruntime fp32", "graphopt cleanup -> ort"):
        row = by_name[name]
        assert row["skipped"] is None and len(row["times_ms"]) == 2 and row["median_ms"] > 0
        assert row["max_abs_error_vs_baseline"] < 1e-4
    assert by_name["torch eager"]["time_ratio"] == 1.0
    assert "median ms" in done.stdout and "speedup" in done.stdout
