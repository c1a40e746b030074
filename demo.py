"""The built-in example, a minute or two on 2 cores: a small ViT trained on sklearn's digits (trained
on first use, about half a minute, then cached) goes through ``token_merge`` and ``integer_only``;
its test accuracy and its speed are measured side by side against the float model in torch, ONNX
Runtime fp32 and ONNX Runtime's own int8 (``quantize_dynamic``), on the ``cpu_integer`` backend
and on ONNX Runtime; token-merge and low-rank trade-off curves; an HTML report.

    python -m graphopt.demo [--out DIR] [--batch 64] [--rounds 12] [--threads N]
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

import graphopt
from graphopt.pipeline import OptimizedModel
from graphopt.progress import showing, task
from graphopt.timing import interleaved

PIPELINE = ["token_merge:r=8", "integer_only"]
TOKEN_MERGE_RS = (0, 8, 16)
LOW_RANK_KEPT = (1.0, 0.9, 0.8)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m graphopt.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for the report and the ONNX files (default: a new temporary folder)")
    p.add_argument("--batch", type=int, default=64, help="images per timed call (default 64)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per variant, interleaved (default 10)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="threads for every runtime")
    args = p.parse_args(argv)
    with showing():  # progress lines for the kernel build, the training, the capture and the passes
        _demo(args)


def _demo(args) -> None:
    from graphopt.backends.cpu_integer_library import available_isas
    from graphopt.zoo import digits_vit

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"GEMM instruction sets the cpu_integer kernels can use on this CPU: {', '.join(available_isas())} "
          f"(torch: {torch.backends.cpu.get_cpu_capability()})")
    with task("the digits ViT (trained on first use, about half a minute, then cached)"):
        case = digits_vit()
    how = (f"loaded from {case.cache_path}" if case.from_cache else
           f"trained in {case.train_seconds:.0f} s, cached in {case.cache_path}")
    print(f"digits ViT: {how}; {len(case.test_images)} test images, float accuracy {case.test_accuracy:.2%}")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="graphopt-demo-"))
    result = run(case, out, batch=args.batch, rounds=args.rounds, threads=args.threads)
    print(f"\nthe whole demo took {time.perf_counter() - start:.0f} s")
    print(f"HTML report: {result['report_path']}")
    print(f"the integer model for Netron: {result['onnx_path']}")


def run(case, out: Path, *, batch: int = 64, rounds: int = 10, threads: int = 2, pipeline=PIPELINE,
        token_merge_rs=TOKEN_MERGE_RS, low_rank_kept=LOW_RANK_KEPT) -> dict:
    """The demo on ``case`` (a ``graphopt.zoo.DigitsCase``-like object: ``model``, ``train_images``,
    ``test_images``, ``test_labels``, ``accuracy``); writes into ``out``; returns the figures."""
    from graphopt.backends.onnx_lowering import to_onnx
    from graphopt.backends.onnxruntime_backend import create_session, write_model
    from graphopt.passes.report_html import write_html

    out.mkdir(parents=True, exist_ok=True)
    xs, xb = case.test_images, case.test_images[:batch]
    calibration = [(case.train_images[i:i + 32],) for i in range(0, 64, 32)]
    float_graph = graphopt.optimize(case.model, [], (xs[:8],)).graph  # captured once, reused below
    om = graphopt.optimize(float_graph, pipeline, (xs[:8],), calibration=calibration, check=True)
    print(om.report)

    fp32_path, int8_path = out / "float.onnx", out / "float_int8_dynamic.onnx"
    write_model(to_onnx(float_graph), str(fp32_path))
    from onnxruntime.quantization import QuantType, quantize_dynamic
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # its advice to pre-process first is for real data sets
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    onnx_path = out / "optimized.onnx"
    om.save(str(onnx_path))
    variants = {
        "float, torch eager": case.model,
        "float, ONNX Runtime": _session_fn(create_session(str(fp32_path), threads=threads)),
        "ONNX Runtime int8 (quantize_dynamic)": _session_fn(create_session(str(int8_path), threads=threads)),
        "graphopt, ONNX Runtime": OptimizedModel(om.graph, om.report, "onnxruntime", {"threads": threads}),
        "graphopt, cpu_integer": OptimizedModel(om.graph, om.report, "cpu_integer", {"threads": threads}),
    }
    logits = {name: _logits(fn, xs) for name, fn in variants.items()}
    ms = medians({name: (lambda fn=fn: fn(xb)) for name, fn in variants.items()}, rounds)
    base = "float, torch eager"
    rows = [{"variant": name, "accuracy": _accuracy(l, case.test_labels),
             "agrees with float": float((l.argmax(-1) == logits[base].argmax(-1)).float().mean()),
             f"ms per batch of {len(xb)}": ms[name], "speed vs float torch": ms[base] / ms[name],
             "speed vs ONNX Runtime int8": ms["ONNX Runtime int8 (quantize_dynamic)"] / ms[name]}
            for name, l in logits.items()]
    identical = torch.equal(logits["graphopt, ONNX Runtime"], logits["graphopt, cpu_integer"])
    _print_rows(rows, f"{len(xs)} test images; speed: median of {rounds} interleaved rounds, batch {len(xb)}, "
                      f"{threads} threads")
    print(f"cpu_integer and ONNX Runtime run the same integer graph: outputs bit-identical: {identical}")
    flops = om.report.cost(batch=len(xb))["flops"]
    print(f"FLOPs per batch of {len(xb)} (cost model): {flops['before'] / 1e6:.0f}M -> {flops['after'] / 1e6:.0f}M "
          f"(x{flops['ratio']:.2f})")

    om.report.attach_table("Accuracy and speed side by side", rows)
    tm = _curve(case, float_graph, xb, rounds, {f"r={r}": [f"token_merge:r={r}"] if r else [] for r in token_merge_rs})
    om.report.attach_curve("token_merge (float, torch): accuracy vs time", tm, f"ms per batch of {len(xb)}",
                           "test accuracy")
    lr = _curve(case, float_graph, xb, rounds, {f"{k:.0%} kept": [f"low_rank:method=svd,ratio={k}"] if k < 1 else []
                                                for k in low_rank_kept})
    om.report.attach_curve("low_rank SVD (float, torch): accuracy vs time", lr, f"ms per batch of {len(xb)}",
                           "test accuracy")
    print("token_merge curve (float):", ", ".join(f"{label} {acc:.1%} {t:.1f} ms" for t, acc, label in tm))
    print("low_rank curve (float, plain SVD):", ", ".join(f"{label} {acc:.1%} {t:.1f} ms" for t, acc, label in lr))
    report_path = out / "report.html"
    write_html(str(report_path), om.report, title="graphopt demo: digits ViT, token_merge + integer_only",
               intro=f"Pipeline {pipeline} on a ViT trained on sklearn digits; accuracy on {len(xs)} held-out "
                     f"test images; speed as the median of {rounds} interleaved rounds in one process, "
                     f"{threads} threads. cpu_integer output bit-identical to ONNX Runtime: {identical}.",
               graph_before=float_graph, graph_after=om.graph, cost_dims={"batch": len(xb)},
               files={"the optimized integer model": str(onnx_path), "the float model": str(fp32_path),
                      "ONNX Runtime's dynamic int8 model": str(int8_path)})
    return {"rows": rows, "identical": identical, "token_merge_curve": tm, "low_rank_curve": lr,
            "report_path": str(report_path), "onnx_path": str(onnx_path), "optimized": om}


def medians(fns: dict, rounds: int) -> dict[str, float]:
    """Milliseconds per call, timed with graphopt.timing's policy (round-robin in one process)."""
    with torch.inference_mode():
        return {k: 1e3 * t.median for k, t in interleaved(fns, rounds).items()}


def _curve(case, graph, xb, rounds, variants: dict) -> list[tuple[float, float, str]]:
    from graphopt.passes import PassManager

    models = {}
    for label, passes in variants.items():
        g, report = PassManager(passes).run(graph)
        models[label] = OptimizedModel(g, report, "torch")
    ms = medians({k: (lambda m=m: m(xb)) for k, m in models.items()}, max(3, rounds // 2))
    return [(ms[k], case.accuracy(m), k) for k, m in models.items()]


def _session_fn(session):
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _logits(fn, x) -> torch.Tensor:
    with torch.inference_mode():
        out = fn(x)
    return getattr(out, "logits", out)


def _accuracy(logits, labels) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def _print_rows(rows, caption) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=caption, title_justify="left")
    for col in rows[0]:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        table.add_row(*(f"{v:.2%}" if k in ("accuracy", "agrees with float") else
                        f"{v:.2f}x" if k.startswith("speed") else f"{v:.1f}" if isinstance(v, float) else str(v)
                        for k, v in r.items()))
    Console(width=max(120, Console().width)).print(table)


if __name__ == "__main__":
    main()
