"""opt-cli: run graphopt passes over an ONNX model.

    opt-cli MODEL.onnx -o OUT.onnx -p dce -p "tome:r=8" --check --report report.html
    opt-cli --list-passes
    opt-cli --explain cse
    opt-cli --demo --check

The input file is never modified; the output is written atomically (temp file + rename) and an
existing file is only replaced with --force. Malformed input exits with status 2 and one line
naming the problem (--debug adds the traceback). Exit status: 0 done, 1 a pass or the lowering
failed, 2 bad input or usage.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A problem with the command line or the input: one line, exit status 2 unless said otherwise."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


# =============================================================================================
# Command line
# =============================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opt-cli", description="Optimize an ONNX model with graphopt passes and write the result as ONNX.",
        epilog="Exit status: 0 done, 1 a pass or the lowering failed, 2 bad input or usage.")
    p.add_argument("model", nargs="?", metavar="MODEL.onnx", help="the ONNX model to optimize (never modified)")
    p.add_argument("-o", "--output", metavar="OUT.onnx", help="where to write the optimized model")
    p.add_argument("-p", "--pass", dest="passes", action="append", default=[], metavar="PASS",
                   help='a pass to run, in order; options as "name:opt=value,opt2=value" (repeatable)')
    p.add_argument("--list-passes", action="store_true", help="list the registered passes and exit")
    p.add_argument("--explain", metavar="PASS", help="show a pass's options and what it rewrites, and exit")
    p.add_argument("--calib", metavar="FILE.npz", help="calibration inputs: one array per model input name "
                   "(an extra leading axis holds several samples)")
    p.add_argument("--check", action="store_true", help="run the input and output models in ONNX Runtime on the "
                   "calibration (or random) inputs: max abs error, cosine similarity, latency ratio")
    p.add_argument("--report", metavar="FILE.json|FILE.html", help="write a report of the run")
    p.add_argument("--why-not", metavar="RULE", help="say where rewrite rule RULE matches in the model, or its best "
                   "partial match and why it failed (after the -p passes), and exit")
    p.add_argument("--demo", action="store_true", help="use the built-in example model (a small ViT) instead of a file")
    p.add_argument("--force", action="store_true", help="replace an existing output or report file")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    g = p.add_argument_group("inputs and measurement")
    g.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a symbolic input dim for random inputs, e.g. --dim batch=8 --dim sequence=128")
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    g.add_argument("--runs", type=int, default=20, help="timed runs per model for --check (default 20)")
    g.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs per model for --check (default 3)")
    g.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own choice)")
    g.add_argument("--opt-level", default="all", choices=["disable", "basic", "extended", "all"],
                   help="ONNX Runtime graph optimization level for --check (default all)")
    g.add_argument("--verify-passes", action="store_true",
                   help="check every pass numerically against the graph before it (torch reference backend)")
    g.add_argument("--opset", type=int, default=None, help="ai.onnx opset to write (default: the input's)")
    g.add_argument("--external-data", action="store_true", help="write the weights to OUT.onnx.data next to the output")
    g.add_argument("-q", "--quiet", action="store_true", help="print no table, only errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("opt-cli: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure becomes one line (and the traceback with --debug)
        code, message = _classify(e)
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        print(f"opt-cli: error: {message}", file=sys.stderr)
        return code


def _classify(error: BaseException) -> tuple[int, str]:
    from graphopt.backends.torch_backend import LoweringError
    from graphopt.frontends.torch_export import ExportError, FrontendError
    from graphopt.passes import PassConfigError, PassError

    text = _one_line(error)
    if isinstance(error, CliError):
        return error.code, text
    if isinstance(error, (FrontendError, PassConfigError)):
        return EXIT_USAGE, text
    if isinstance(error, PassError):
        return EXIT_FAILED, text
    if isinstance(error, (LoweringError, ExportError)):
        return EXIT_FAILED, text
    return EXIT_FAILED, f"internal error: {type(error).__name__}: {text} (run with --debug for the traceback)"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


# =============================================================================================
# Progress
# =============================================================================================
class Progress:
    """Spinner and a done line per step on a terminal; silent otherwise. Records step times."""

    def __init__(self, enabled: bool):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, text: str, key: str | None = None):
        start = time.perf_counter()
        if self.enabled:
            with self.console.status(text + " ..."):
                yield
        else:
            yield
        seconds = time.perf_counter() - start
        self.timings[key or text] = round(self.timings.get(key or text, 0.0) + seconds, 4)
        if self.enabled:
            self.console.print(f"[green]done[/green] {text} [dim]({seconds:.1f} s)[/dim]", highlight=False)


# =============================================================================================
# The run
# =============================================================================================
@dataclass
class ModelSide:
    """One side of the comparison (input or output model)."""
    proto: object = None
    path: str | None = None
    ops: dict = field(default_factory=dict)
    parameters: int = 0
    weight_bytes: int = 0
    file_bytes: int | None = None
    sha256: str | None = None
    data_files: list = field(default_factory=list)
    example: dict | None = None  # inputs that come with the model (the demo's)


def run(args) -> int:
    if args.list_passes:
        return _list_passes()
    if args.explain:
        return _explain(args.explain)
    if args.demo and args.model:
        raise CliError("give either MODEL.onnx or --demo, not both")
    if not args.demo and not args.model:
        raise CliError("no model: give MODEL.onnx (or --demo for the built-in example); see opt-cli --help")
    if args.runs < 1 or args.warmup < 0:
        raise CliError("--runs must be at least 1 and --warmup at least 0")

    from graphopt.passes import make_spec

    specs = [make_spec(p) for p in args.passes]  # bad pass names and options fail before any work
    dims = _parse_dims(args.dim)
    output = _check_output_path(args.output, args.model, args.force, (".onnx",), "output")
    report_path = _check_output_path(args.report, args.model, args.force, (".json", ".html", ".htm"), "report")
    progress = Progress(enabled=not args.quiet)

    before, graph, source = _load(args, progress)
    if output is not None:
        _refuse_input_overlap(output, before.data_files)

    feeds, input_note, calibration = _inputs(args, graph, dims, before.example)
    graph, pipeline = _run_passes(graph, specs, feeds, calibration, args.verify_passes, progress)
    if args.why_not:
        from graphopt.ir.rewrite import get_rule, why_not
        from graphopt.passes import list_passes

        list_passes()  # loads the built-in rule sets
        try:
            rule = get_rule(args.why_not)
        except KeyError as e:
            raise CliError(str(e).strip('"')) from None
        print(why_not(graph, rule))
        return EXIT_OK

    from graphopt.backends.onnx_lowering import to_onnx
    from graphopt.backends.onnxruntime_backend import write_model

    with progress.step("writing ONNX" if output else "lowering to ONNX", "lower"):
        proto_out = to_onnx(graph, opset=args.opset)
        after = _describe(proto_out)
        written = []
        if output is not None:
            written = write_model(proto_out, output, external_data=True if args.external_data else None)
            after.path = output
            after.file_bytes = sum(os.path.getsize(p) for p in written)
            after.sha256 = _sha256_file(output)
        else:
            after.file_bytes = proto_out.ByteSize()

    check = None
    if args.check:
        check = _check(before, proto_out, feeds, args, progress)

    summary = {"source": source, "input": before, "output": after, "passes": [str(s) for s in specs],
               "pipeline": pipeline, "check": check, "inputs": input_note, "timings": progress.timings,
               "written": written}
    if not args.quiet:
        _print_summary(summary)
    if report_path is not None:
        _write_report(report_path, summary)
    return EXIT_OK


# ---- pass listing ------------------------------------------------------------------------------
def _list_passes() -> int:
    from rich.console import Console
    from rich.table import Table

    from graphopt.passes import get_pass, list_passes

    table = Table(title="graphopt passes (opt-cli --explain NAME for options)")
    table.add_column("pass")
    table.add_column("what it does")
    table.add_column("check", justify="right")
    for name in list_passes():
        info = get_pass(name)
        first = info.description.splitlines()[0] if info.description else ""
        tol = "lossy" if info.tolerance is None else f"<= {info.tolerance:g}"
        table.add_row(name, first, tol)
    Console().print(table)
    return EXIT_OK


def _explain(name: str) -> int:
    import importlib

    from graphopt.passes import get_pass, pass_help

    info = get_pass(name)  # unknown names raise PassConfigError with a suggestion (exit 2)
    print(pass_help(name))
    try:
        doc = importlib.import_module(info.module).__doc__
    except ImportError:
        doc = None
    if doc and doc.strip():
        print("\nwhat it rewrites:")
        print("\n".join("  " + line for line in doc.strip().splitlines()))
    return EXIT_OK


# ---- paths -------------------------------------------------------------------------------------
def _check_output_path(path, model, force, suffixes, what) -> str | None:
    if path is None:
        return None
    full = os.path.abspath(path)
    if not full.lower().endswith(suffixes):
        raise CliError(f"{what} file {path} must end in {' or '.join(suffixes)}")
    if model and os.path.exists(model) and os.path.realpath(full) == os.path.realpath(model):
        raise CliError(f"refusing to overwrite the input model {model}; choose another {what} file")
    if os.path.isdir(full):
        raise CliError(f"{what} path {path} is a directory")
    if not os.path.isdir(os.path.dirname(full)):
        raise CliError(f"{what} folder {os.path.dirname(full)} does not exist")
    if os.path.exists(full) and not force:
        raise CliError(f"{what} file {path} already exists; pass --force to replace it")
    return full


def _refuse_input_overlap(output, data_files) -> None:
    data_files = {os.path.realpath(p) for p in data_files}
    if os.path.realpath(output) in data_files or os.path.realpath(output + ".data") in data_files:
        raise CliError(f"refusing to write {output}: the input model reads its weights from that file")


def _parse_dims(items) -> dict[str, int]:
    dims = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise CliError(f"--dim {item!r}: write NAME=SIZE with a positive integer size, e.g. --dim batch=8")
        dims[name.strip()] = int(value)
    return dims


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- loading -----------------------------------------------------------------------------------
def _load(args, progress):
    from graphopt.frontends.onnx_frontend import check_external_data, from_onnx, load_external, load_model

    if args.demo:
        return _load_demo(progress)
    path = args.model
    with progress.step(f"reading {path}", "read"):
        proto = load_model(path, load_external_data=False)
        base = os.path.dirname(os.path.abspath(path))
        data_files = check_external_data(proto, base, path)
        load_external(proto, base, path)
    before = _describe(proto)
    before.path = os.path.abspath(path)
    before.data_files = data_files
    before.file_bytes = os.path.getsize(path) + sum(os.path.getsize(p) for p in data_files)
    before.sha256 = _sha256_file(path)
    with progress.step("converting to the IR", "convert"):
        graph = from_onnx(proto, name=os.path.splitext(os.path.basename(path))[0])
    return before, graph, path


def _load_demo(progress):
    try:
        from graphopt.zoo import tiny_vit
    except ImportError as e:
        raise CliError(f"--demo needs graphopt.zoo.tiny_vit, which is not available: {e}", EXIT_FAILED) from None
    from graphopt.backends.onnx_lowering import to_onnx
    from graphopt.frontends import from_torch

    from graphopt.pipeline import _flat_tensors

    with progress.step("capturing the built-in example (tiny ViT)", "capture"):
        case = tiny_vit()
        graph = from_torch(case.model, tuple(case.args), dict(case.kwargs))
        proto = to_onnx(graph)
    before = _describe(proto)
    before.file_bytes = proto.ByteSize()
    # the example's own inputs are the default inputs of --check and the passes
    flat = _flat_tensors(graph, tuple(case.args), dict(case.kwargs))
    before.example = {v.name: t.numpy() for v, t in zip(graph.inputs, flat)}
    return before, graph, "demo: graphopt.zoo.tiny_vit()"


_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2}


def _describe(proto) -> ModelSide:
    ops = Counter()
    for n in proto.graph.node:
        ops[f"{n.domain}::{n.op_type}" if n.domain and n.domain != "ai.onnx" else n.op_type] += 1
    params = weight = 0
    for t in proto.graph.initializer:
        numel = math.prod(t.dims) if len(t.dims) else 1
        params += numel
        weight += numel * _ITEMSIZE.get(t.data_type, 1)
    return ModelSide(proto=proto, ops=dict(sorted(ops.items())), parameters=params, weight_bytes=weight)


# ---- inputs ------------------------------------------------------------------------------------
def _inputs(args, graph, dims, example=None):
    """Feeds (name -> numpy) for --check and the passes; calibration samples when --calib is given."""
    import numpy as np

    if args.calib:
        samples = _read_calib(args.calib, graph)
        note = {"source": f"calibration file {args.calib}", "samples": len(samples),
                "shapes": {k: list(v.shape) for k, v in samples[0].items()}}
        return samples[0], note, samples
    if example is not None and not dims:
        note = {"source": "the example's inputs", "shapes": {k: list(v.shape) for k, v in example.items()}}
        return example, note, None
    rng = np.random.default_rng(args.seed)
    bindings, used = _bind_dims(graph, dims)
    feeds = {}
    for value in graph.inputs:
        shape = [_evaluate(d, bindings) for d in value.type.shape]
        feeds[value.name] = _random_input(value, shape, graph, rng)
    note = {"source": f"random (seed {args.seed})", "dims": used,
            "shapes": {k: list(v.shape) for k, v in feeds.items()}}
    return feeds, note, None


def _bind_dims(graph, dims):
    symbols = sorted({s for v in graph.inputs for d in v.type.shape if not isinstance(d, int)
                      for s in d.free_symbols}, key=lambda s: s.name)
    unknown = set(dims) - {s.name for s in symbols}
    if unknown:
        raise CliError(f"--dim {', '.join(sorted(unknown))}: the model has no such input dim "
                       f"(its symbolic dims: {', '.join(s.name for s in symbols) or 'none'})")
    bindings, used = {}, {}
    for s in symbols:
        value = dims.get(s.name, _default_size(s.name))
        bindings[s] = value
        used[s.name] = value
    return bindings, used


def _default_size(name: str) -> int:
    lowered = name.lower()
    return 1 if "batch" in lowered or lowered in ("n", "b", "bs") else 16


def _evaluate(dim, bindings) -> int:
    if isinstance(dim, int):
        return dim
    value = dim.subs(bindings)
    if not value.is_Integer or int(value) < 0:
        raise CliError(f"input dim {dim} does not evaluate to a size with {bindings}; set it with --dim")
    return int(value)


def _random_input(value, shape, graph, rng):
    import numpy as np
    import torch

    dtype = value.type.dtype
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype if dtype is not torch.bfloat16 else np.float32
    name = value.name.lower()
    if dtype.is_floating_point:
        return rng.standard_normal(shape).astype(np_dtype)
    if dtype is torch.bool:
        return np.ones(shape, dtype=bool) if "mask" in name else rng.integers(0, 2, shape).astype(bool)
    if "mask" in name:
        return np.ones(shape, dtype=np_dtype)
    if "type" in name or "segment" in name:
        return np.zeros(shape, dtype=np_dtype)
    high = _index_bound(value, graph) or 2
    return rng.integers(0, high, shape).astype(np_dtype)


def _index_bound(value, graph) -> int | None:
    """The smallest table an integer input indexes into (embedding rows, Gather axis), if any."""
    bounds = []
    pending, seen = [value], set()
    while pending:
        v = pending.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for node in v.users:
            if node.op == "cast" or (node.op == "reshape" and node.inputs[0] is v):
                pending.extend(node.outputs)
            elif node.op == "embedding" and node.inputs[1] is v:
                bounds.append(node.inputs[0].type.shape[0])
            elif node.op in ("index_select", "gather") and node.inputs[1] is v:
                bounds.append(node.inputs[0].type.shape[node.attrs["dim"]])
            elif node.op == "onnx_opaque" and node.attrs["op_type"] in ("Gather", "GatherElements") \
                    and node.inputs[1] is v:
                axis = node.attrs["attributes"].get("axis", 0) if node.attrs["attributes"] is not None else 0
                bounds.append(node.inputs[0].type.shape[axis])
            elif node.op == "onnx_opaque" and node.attrs["op_type"] == "EmbedLayerNormalization":
                position = next(i for i, x in enumerate(node.inputs) if x is v)
                table = {0: 2, 1: 3}.get(position)  # input_ids -> word table, segment_ids -> segment table
                if table is not None and table < len(node.inputs) and node.inputs[table] is not None:
                    bounds.append(node.inputs[table].type.shape[0])
    ints = [b for b in bounds if isinstance(b, int)]
    return min(ints) if ints else None


def _read_calib(path, graph):
    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise CliError(f"calibration file {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # not an npz, truncated, or pickled objects
        raise CliError(f"calibration file {path} is not a readable .npz of arrays: {_one_line(e)}") from None
    names = [v.name for v in graph.inputs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no array for input(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown name(s) {', '.join(extra)}")
        raise CliError(f"calibration file {path}: {'; '.join(parts)} (model inputs: {', '.join(names)})")
    counts = set()
    per_input = {}
    for value in graph.inputs:
        array = arrays[value.name]
        rank = value.type.rank
        if array.ndim == rank:
            per_input[value.name] = [array]
        elif array.ndim == rank + 1:
            per_input[value.name] = list(array)
        else:
            raise CliError(f"calibration file {path}: array {value.name!r} has shape {list(array.shape)}, the input "
                           f"is {value.type} (give it that rank, or one more for several samples)")
        counts.add(len(per_input[value.name]))
        want = torch.empty((), dtype=value.type.dtype).numpy().dtype if value.type.dtype is not torch.bfloat16 else None
        if want is not None and array.dtype != want:
            if np.can_cast(array.dtype, want, casting="same_kind"):
                per_input[value.name] = [a.astype(want) for a in per_input[value.name]]
            else:
                raise CliError(f"calibration file {path}: array {value.name!r} is {array.dtype}, the input is {want}")
        for sample in per_input[value.name]:
            for d, size in zip(value.type.shape, sample.shape):
                if isinstance(d, int) and d != size:
                    raise CliError(f"calibration file {path}: array {value.name!r} has shape {list(sample.shape)}, "
                                   f"the input is {value.type}")
    if len(counts) != 1:
        raise CliError(f"calibration file {path}: inputs have different sample counts {sorted(counts)}")
    n = counts.pop()
    return [{name: per_input[name][i] for name in names} for i in range(n)]


# ---- passes ------------------------------------------------------------------------------------
def _run_passes(graph, specs, feeds, calibration, verify, progress):
    import torch

    from graphopt.passes import PassManager, Report

    report = Report()
    flat = tuple(torch.from_numpy(feeds[v.name]) for v in graph.inputs)
    calib = [tuple(torch.from_numpy(s[v.name]) for v in graph.inputs) for s in calibration] if calibration else None
    for i, spec in enumerate(specs, 1):
        with progress.step(f"pass {i}/{len(specs)}: {spec}", f"pass:{spec}"):
            graph, report = PassManager([spec], example_inputs=flat, calibration=calib, check=verify).run(graph, report)
    return graph, report


# ---- --check -----------------------------------------------------------------------------------
def _check(before: ModelSide, proto_out, feeds, args, progress) -> dict:
    import numpy as np

    from graphopt.backends.onnxruntime_backend import create_session

    options = dict(threads=args.threads, optimization_level=args.opt_level, providers=["CPUExecutionProvider"])
    with progress.step("loading both models in ONNX Runtime", "check:sessions"):
        source = before.path if before.path else before.proto
        s_in = create_session(source, **options)
        s_out = create_session(proto_out, **options)
    in_names = {i.name for i in s_in.get_inputs()}
    feeds_in = {k: v for k, v in feeds.items() if k in in_names}
    feeds_out = {k: v for k, v in feeds.items() if k in {i.name for i in s_out.get_inputs()}}
    with progress.step(f"timing both models ({args.warmup} warm-up + {args.runs} runs each)", "check:runs"):
        ref = s_in.run(None, feeds_in)
        got = s_out.run(None, feeds_out)
        times = {"in": [], "out": []}
        sides = {"in": (s_in, feeds_in), "out": (s_out, feeds_out)}
        first = (args.runs + 1) // 2
        # blocks in the order in, out, out, in: load drift hits both models alike
        for side, count in (("in", first), ("out", first), ("out", args.runs - first), ("in", args.runs - first)):
            sess, feeds_side = sides[side]
            for _ in range(args.warmup if count else 0):
                sess.run(None, feeds_side)
            for _ in range(count):
                start = time.perf_counter()
                sess.run(None, feeds_side)
                times[side].append(time.perf_counter() - start)
        t_in, t_out = times["in"], times["out"]
    out_names_in = [o.name for o in s_in.get_outputs()]
    out_names_out = [o.name for o in s_out.get_outputs()]
    if len(out_names_out) != len(out_names_in):
        raise CliError(f"--check: the input model has {len(out_names_in)} outputs, the output model "
                       f"{len(out_names_out)}", EXIT_FAILED)
    pairs = []
    for i, name in enumerate(out_names_in):
        j = out_names_out.index(name) if name in out_names_out else i
        if j < len(got):
            pairs.append((name, np.asarray(ref[i]), np.asarray(got[j])))
    per_output, worst = {}, 0.0
    dots = norm_a = norm_b = 0.0
    for name, a, b in pairs:
        if a.shape != b.shape:
            per_output[name] = {"max_abs_error": float("inf"), "shape_before": list(a.shape), "shape_after": list(b.shape)}
            worst = float("inf")
            continue
        a64, b64 = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
        err = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
        per_output[name] = {"max_abs_error": err}
        worst = max(worst, err)
        dots += float(a64 @ b64)
        norm_a += float(a64 @ a64)
        norm_b += float(b64 @ b64)
    cosine = dots / math.sqrt(norm_a * norm_b) if norm_a > 0 and norm_b > 0 else (1.0 if norm_a == norm_b else 0.0)
    med_in, med_out = statistics.median(t_in), statistics.median(t_out)
    return {"max_abs_error": worst, "cosine": cosine, "outputs": per_output,
            "latency_before_ms": med_in * 1e3, "latency_after_ms": med_out * 1e3,
            "latency_ratio": med_out / med_in if med_in > 0 else float("nan"),
            "runs": args.runs, "warmup": args.warmup, "threads": args.threads, "optimization_level": args.opt_level}


# ---- output ------------------------------------------------------------------------------------
def _human_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _human_count(n) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _delta(a, b) -> str:
    if a == b:
        return ""
    return f"{b - a:+d}"


def summary_tables(summary) -> list:
    from rich.table import Table

    before, after = summary["input"], summary["output"]
    title = f"{summary['source']} -> {after.path or '(not written)'}"
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    total_b, total_a = sum(before.ops.values()), sum(after.ops.values())
    table.add_row("ops (total)", str(total_b), str(total_a), _delta(total_b, total_a))
    for op in sorted(set(before.ops) | set(after.ops)):
        b, a = before.ops.get(op, 0), after.ops.get(op, 0)
        table.add_row(f"  {op}", str(b), str(a), _delta(b, a))
    table.add_row("parameters", _human_count(before.parameters), _human_count(after.parameters),
                  _delta(before.parameters, after.parameters))
    table.add_row("weight bytes", _human_bytes(before.weight_bytes), _human_bytes(after.weight_bytes), "")
    table.add_row("file bytes", _human_bytes(before.file_bytes), _human_bytes(after.file_bytes), "")
    tables = [table]
    check = summary["check"]
    if check is not None:
        t = Table(title=f"--check in ONNX Runtime ({summary['inputs']['source']}, median of {check['runs']} runs)",
                  title_justify="left")
        t.add_column("figure")
        t.add_column("value", justify="right")
        t.add_row("max abs error", f"{check['max_abs_error']:.3e}")
        t.add_row("cosine similarity", f"{check['cosine']:.6f}")
        t.add_row("latency before", f"{check['latency_before_ms']:.2f} ms")
        t.add_row("latency after", f"{check['latency_after_ms']:.2f} ms")
        t.add_row("latency ratio (after / before)", f"{check['latency_ratio']:.3f}x")
        tables.append(t)
    pipeline = summary["pipeline"]
    if pipeline.passes:
        tables.insert(0, pipeline.table())
    return tables


def _print_summary(summary) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # piped or captured: wide enough that no column is cut
    for table in summary_tables(summary):
        console.print(table)


def report_dict(summary) -> dict:
    from graphopt import __version__

    def side(s: ModelSide):
        return {"path": s.path, "sha256": s.sha256, "file_bytes": s.file_bytes, "parameters": s.parameters,
                "weight_bytes": s.weight_bytes, "ops": s.ops, "ops_total": sum(s.ops.values())}

    return {"tool": "opt-cli", "graphopt_version": __version__, "source": summary["source"],
            "input": side(summary["input"]), "output": side(summary["output"]), "passes": summary["passes"],
            "pipeline": summary["pipeline"].to_dict(), "check": summary["check"], "inputs": summary["inputs"],
            "timings_seconds": summary["timings"], "files_written": summary["written"]}


def _write_report(path, summary) -> None:
    from graphopt.backends.onnxruntime_backend import _atomic_write

    data = report_dict(summary)
    if path.lower().endswith(".json"):
        text = json.dumps(data, indent=2, default=_json_default)
    else:
        text = _html_report(summary, data)
    _atomic_write(path, text.encode())


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def _html_report(summary, data) -> str:
    from graphopt.passes.report_html import render_html

    return render_html(summary["pipeline"], title=f"graphopt report: {data['source']}",
                       intro=f"passes: {', '.join(data['passes']) or '(none)'}; inputs: {data['inputs'].get('source')}",
                       check=summary["check"], models={"input": data["input"], "output": data["output"]},
                       files={"output model": data["output"]["path"]} if data["output"]["path"] else None)


if __name__ == "__main__":
    sys.exit(main())
