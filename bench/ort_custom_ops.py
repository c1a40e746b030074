"""The cpu_integer kernels inside ONNX Runtime (issue 18): the same integer DeiT-S-shaped ViT run by the
``cpu_integer`` backend and by ONNX Runtime with graphopt's custom-op library (the model opt-cli writes
with --ort-custom-ops), side by side in one process, interleaved; medians, the ratio, and whether the
outputs are bit-identical. The portable standard-op ONNX of the same graph is timed too, for scale.

    python -m graphopt.bench.ort_custom_ops [--batch 8 --runs 15 --threads 2]

Results go to bench/results/ort_custom_ops.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import graphopt
from graphopt import zoo
from graphopt.timing import interleaved

RESULTS = Path(__file__).resolve().parent / "results"
INTEGER_ONLY = {"smoothquant": 0.7}  # as bench/integer_only.py's int_only


def run(args) -> dict:
    from graphopt.backends import ort_custom_ops
    from graphopt.backends.onnx import to_onnx
    from graphopt.backends.onnx.cpu_integer_ops import to_onnx_custom_ops
    from graphopt.backends.onnxruntime_backend import create_session
    from graphopt.backends.registry import lower

    torch.set_num_threads(args.threads)
    model = zoo.deit_small(args.batch).model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, generator=g)
    calib = [(torch.randn(args.batch, 3, 224, 224, generator=g),) for _ in range(args.calib)]
    graph = graphopt.optimize(model, [("integer_only", INTEGER_ONLY)], (x,), calibration=calib).graph
    kernels = lower(graph, "cpu_integer", threads=args.threads)
    custom = ort_custom_ops.session(to_onnx_custom_ops(graph), threads=args.threads)
    standard = create_session(to_onnx(graph), threads=args.threads)
    name = custom.get_inputs()[0].name
    feed = {name: x.numpy()}
    fns = {"cpu_integer": lambda: kernels.run_flat(x), "ort_custom_ops": lambda: custom.run(None, feed),
           "ort_standard_ops": lambda: standard.run(None, {standard.get_inputs()[0].name: x.numpy()})}
    with torch.inference_mode():
        ref = kernels.run_flat(x)[0]
        identical = torch.equal(ref, torch.from_numpy(custom.run(None, feed)[0]))
        med = {k: t.median * 1e3 for k, t in interleaved(fns, args.runs).items()}
    result = {"what": "cpu_integer kernels in ONNX Runtime", "model": "DeiT-S-shaped ViT (HF, random weights)",
              "batch": args.batch, "threads": args.threads, "runs": args.runs, "median_ms": med,
              "ort_custom_ops_vs_cpu_integer": med["ort_custom_ops"] / med["cpu_integer"],
              "bit_identical": identical}
    for k, v in med.items():
        print(f"{k:18s} {v:8.1f} ms  {v / med['cpu_integer']:5.2f}x cpu_integer")
    print("ORT custom ops output bit-identical to cpu_integer's:", identical)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib", type=int, default=2, help="calibration batches")
    args = p.parse_args(argv)
    result = run(args)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "ort_custom_ops.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1:])
