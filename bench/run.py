"""Side-by-side benchmark: torch eager, ONNX Runtime fp32, ONNX Runtime dynamic int8 and the graphopt
pipelines of ``bench/pipelines.py``, in one process, on the same inputs.

    python -m bench.run --model deit_small --batch 8            # from the repository root
    python bench/run.py --model minilm --batch 8 --seq 128 --runs 30

Every runner is prepared first (export, quantization, graphopt passes), then timed with graphopt.timing
(warm-up rounds, then rounds that visit every runner in turn, alternating the order), so drift in the
load of a shared machine hits every runner alike.
The table shows medians and ratios to the first baseline (torch eager); the JSON in bench/results/
keeps every timing. Ratios from one run are comparable; absolute times on a busy machine are not.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from graphopt.timing import Timing, interleaved

if __package__:  # python -m bench.run (or graphopt.bench.run)
    from .models import MODELS, primary_output
    from .pipelines import PIPELINES
else:  # python bench/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.models import MODELS, primary_output
    from bench.pipelines import PIPELINES

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Runner:
    name: str
    kind: str  # "baseline" or "graphopt"
    call: object = None
    prepare_seconds: float = 0.0
    timing: Timing | None = None
    output: object = None
    skipped: str | None = None
    note: str = ""


def build_parser():
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="sequence length for text models (default 128)")
    p.add_argument("--runs", type=int, default=20, help="timed calls per runner (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per runner first (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for torch and ONNX Runtime")
    p.add_argument("--pipelines", default="all", help="comma-separated graphopt pipeline names, or 'all' / 'none'")
    p.add_argument("--no-int8", action="store_true", help="skip the quantize_dynamic baseline")
    p.add_argument("--out", help="JSON path (default bench/results/<model>-b<batch>-<time>.json)")
    p.add_argument("--list", action="store_true", help="list models and pipelines and exit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print("models:", ", ".join(sorted(MODELS)))
        for p in PIPELINES.values():
            print(f"pipeline {p.name!r}: {', '.join(map(str, p.passes))} -> {p.backend}  {p.description}")
        return 0
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    load = _load_average()
    if load is not None and load > (os.cpu_count() or 1):
        print(f"warning: this machine is busy (load average {load:.1f} on {os.cpu_count()} cores); timings with "
              f"{args.threads} threads will be noisy (--threads 1 suffers least)", file=sys.stderr)
    case = MODELS[args.model](args.batch, args.seq)
    call_args, call_kwargs = tuple(case.args), dict(case.kwargs)
    feeds_np = _numpy_feeds(case)

    runners: list[Runner] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
        runners.append(_prepare("torch eager", "baseline", lambda: _torch_eager(case)))
        fp32_path = os.path.join(tmp, "model.onnx")
        runners.append(_prepare("onnxruntime fp32", "baseline", lambda: _ort_fp32(case, fp32_path, feeds_np, args)))
        if not args.no_int8:
            runners.append(_prepare("onnxruntime int8 (quantize_dynamic)", "baseline",
                                    lambda: _ort_int8(fp32_path, os.path.join(tmp, "model.int8.onnx"), feeds_np, args)))
        for pipeline in _selected_pipelines(args):
            runners.append(_prepare(pipeline.name, "graphopt", lambda p=pipeline: _graphopt(p, case, args)))

        active = [r for r in runners if r.skipped is None]
        for r in active:  # the first call gives the output to compare
            r.output = _to_numpy(primary_output(r.call()))
        timings = interleaved({r.name: r.call for r in active}, args.runs, args.warmup) if active else {}
        for r in active:
            r.timing = timings[r.name]

    result = _result(args, runners, call_args, call_kwargs)
    path = args.out or os.path.join(RESULTS, f"{args.model}-b{args.batch}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    _print_table(result, path)
    return 0


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


# ---- runners -----------------------------------------------------------------------------------
def _prepare(name, kind, build) -> Runner:
    start = time.perf_counter()
    runner = Runner(name, kind)
    try:
        built = build()
        runner.call, runner.note = built if isinstance(built, tuple) else (built, "")
    except _Skip as e:
        runner.skipped = str(e)
    except Exception as e:  # a failing runner is reported, the others still run
        runner.skipped = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
    runner.prepare_seconds = time.perf_counter() - start
    print(f"prepared {name}: {'skipped (' + runner.skipped + ')' if runner.skipped else 'ok'} "
          f"({runner.prepare_seconds:.1f} s)", file=sys.stderr)
    return runner


class _Skip(Exception):
    pass


def _torch_eager(case):
    model, args, kwargs = case.model, tuple(case.args), dict(case.kwargs)

    def call():
        with torch.no_grad():
            return model(*args, **kwargs)
    return call


def _dynamic_shapes(case):
    if hasattr(case, "dynamic_shapes"):
        return case.dynamic_shapes()
    from graphopt.frontends.torch_export import _batch_dynamic_shapes

    return _batch_dynamic_shapes(case.model, tuple(case.args), dict(case.kwargs))


def _ort_fp32(case, path, feeds, args):
    import onnx

    from graphopt.backends.onnxruntime_backend import create_session

    batch = next(t.shape[0] for t in list(case.args) + list(case.kwargs.values()) if isinstance(t, torch.Tensor))
    program = torch.onnx.export(case.model, tuple(case.args), kwargs=dict(case.kwargs) or None, dynamo=True,
                                dynamic_shapes=_dynamic_shapes(case) if batch >= 2 else None, verbose=False)
    program.save(path)
    model = onnx.load(path)
    del model.graph.value_info[:]  # exporter value_info can contradict shape inference (shared constants)
    onnx.save_model(model, path)
    session = create_session(path, threads=args.threads, providers=["CPUExecutionProvider"])
    feeds = _feeds_for(session, feeds)
    return (lambda: session.run(None, feeds)[0]), "torch.onnx.export(dynamo=True)"


def _ort_int8(fp32_path, path, feeds, args):
    from onnxruntime.quantization import quantize_dynamic

    from graphopt.backends.onnxruntime_backend import create_session

    if not os.path.exists(fp32_path):
        raise _Skip("needs the fp32 ONNX export, which failed")
    quantize_dynamic(fp32_path, path)
    session = create_session(path, threads=args.threads, providers=["CPUExecutionProvider"])
    feeds = _feeds_for(session, feeds)
    return (lambda: session.run(None, feeds)[0]), "weights int8, activations uint8 (dynamic)"


def _graphopt(pipeline, case, args):
    import graphopt
    from graphopt.passes import PassConfigError, make_spec

    if pipeline.models and args.model not in pipeline.models:
        raise _Skip(f"only for {', '.join(pipeline.models)}")
    try:
        specs = [make_spec(p) for p in pipeline.passes]
    except PassConfigError as e:
        raise _Skip(f"not available in this checkout: {e}") from None
    example = (tuple(case.args), dict(case.kwargs))
    calibration = [example] if pipeline.needs_calibration else None
    options = dict(pipeline.backend_options)
    if pipeline.backend == "onnxruntime":
        options.setdefault("threads", args.threads)
        options.setdefault("providers", ["CPUExecutionProvider"])
    batch = next(t.shape[0] for t in list(case.args) + list(case.kwargs.values()) if isinstance(t, torch.Tensor))
    om = graphopt.optimize(case.model, specs, example, backend=pipeline.backend, calibration=calibration,
                           dynamic_batch=batch >= 2, backend_options=options)
    args_, kwargs_ = example
    return (lambda: om(*args_, **kwargs_)), f"{', '.join(str(s) for s in specs) or '(no passes)'} -> {pipeline.backend}"


def _selected_pipelines(args):
    if args.pipelines == "none":
        return []
    if args.pipelines == "all":
        return list(PIPELINES.values())
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    unknown = [n for n in names if n not in PIPELINES]
    if unknown:
        raise SystemExit(f"unknown pipeline(s) {unknown}; known: {sorted(PIPELINES)}")
    return [PIPELINES[n] for n in names]


# ---- inputs and outputs ------------------------------------------------------------------------
def _numpy_feeds(case) -> dict:
    import inspect

    bound = inspect.signature(case.model.forward).bind(*case.args, **case.kwargs)
    return {name: value.numpy() for name, value in bound.arguments.items() if isinstance(value, torch.Tensor)}


def _feeds_for(session, feeds) -> dict:
    names = [i.name for i in session.get_inputs()]
    if all(n in feeds for n in names):
        return {n: feeds[n] for n in names}
    values = list(feeds.values())
    if len(values) != len(names):
        raise RuntimeError(f"cannot match inputs {list(feeds)} to the ONNX inputs {names}")
    return dict(zip(names, values))


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _compare(reference, output):
    if reference is None or output is None or reference.shape != output.shape:
        return None, None
    a, b = reference.astype(np.float64).ravel(), output.astype(np.float64).ravel()
    cosine = float(a @ b / math.sqrt((a @ a) * (b @ b))) if (a @ a) > 0 and (b @ b) > 0 else None
    return float(np.abs(a - b).max()), cosine


def _result(args, runners, call_args, call_kwargs) -> dict:
    import onnx
    import onnxruntime

    base = next((r for r in runners if r.timing), None)
    base_median = base.timing.median if base else None
    rows = []
    for r in runners:
        row = {"name": r.name, "kind": r.kind, "note": r.note, "prepare_seconds": round(r.prepare_seconds, 3),
               "skipped": r.skipped}
        if r.timing:
            median = r.timing.median
            error, cosine = _compare(base.output if base else None, r.output)
            row.update(median_ms=median * 1e3, p10_ms=r.timing.p10 * 1e3, p90_ms=r.timing.p90 * 1e3,
                       mean_ms=sum(r.timing.times) / len(r.timing.times) * 1e3,
                       times_ms=[t * 1e3 for t in r.timing.times],
                       time_ratio=median / base_median, speedup=base_median / median,
                       max_abs_error_vs_baseline=error, cosine_vs_baseline=cosine)
        rows.append(row)
    shapes = {f"arg{i}": list(t.shape) for i, t in enumerate(call_args) if isinstance(t, torch.Tensor)}
    shapes.update({k: list(v.shape) for k, v in call_kwargs.items() if isinstance(v, torch.Tensor)})
    return {"model": args.model, "batch": args.batch, "seq": args.seq, "runs": args.runs, "warmup": args.warmup,
            "threads": args.threads, "baseline": base.name if base else None, "input_shapes": shapes,
            "environment": {"python": platform.python_version(), "machine": platform.machine(),
                            "processor": platform.processor(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                            "load_average_at_end": _load_average()},
            "runners": rows}


def _print_table(result, path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['model']}, batch {result['batch']}, {result['threads']} threads, "
                        f"median of {result['runs']} runs (ratios to {result['baseline']})", title_justify="left")
    for col in ("runner", "median ms", "p10-p90 ms", "time ratio", "speedup", "max abs err", "cosine", "prepare s"):
        table.add_column(col, justify="left" if col == "runner" else "right")
    for row in result["runners"]:
        if row.get("median_ms") is None:
            table.add_row(row["name"], "-", "-", "-", "-", "-", "-", f"{row['prepare_seconds']:.1f}",
                          style="dim", end_section=False)
            table.add_row(f"  skipped: {row['skipped']}", "", "", "", "", "", "", "", style="dim")
            continue
        err = row["max_abs_error_vs_baseline"]
        cos = row["cosine_vs_baseline"]
        table.add_row(row["name"], f"{row['median_ms']:.1f}", f"{row['p10_ms']:.1f}-{row['p90_ms']:.1f}",
                      f"{row['time_ratio']:.3f}", f"{row['speedup']:.2f}x", "-" if err is None else f"{err:.2e}",
                      "-" if cos is None else f"{cos:.6f}", f"{row['prepare_seconds']:.1f}")
    console = Console() if Console().is_terminal else Console(width=150)
    console.print(table)
    console.print(f"results: {path}")


if __name__ == "__main__":
    sys.exit(main())
