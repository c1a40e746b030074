"""opt-cli: run graphopt passes over an ONNX model.

    opt-cli MODEL.onnx -o OUT.onnx -p dce -p "token_merge:r=8" --check --report report.html
    opt-cli --list-passes
    opt-cli --explain cse
    opt-cli --demo --check

No input file (the model, its external data, the calibration file) is ever written; an existing
file is only replaced with --force; the output, its side data file and the report are staged in
temp files and moved into place only when the whole command succeeded (a failed --check writes
nothing). Malformed input exits with status 2 and one line naming the problem (--debug adds the
traceback). Work is bounded before it is done: only regular files are read, random inputs are
made only for --check / --verify-passes and refused over a size cap, and ONNX Runtime runs in a
child process so that a crash in it is one line, not a dead process. Exit status: 0 done, 1 a pass,
the lowering or the --check failed, 2 bad input or usage.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LISTING = "opt-cli --list-passes"  # what an unknown-pass error tells a CLI user to run
MAX_RANDOM_INPUT_BYTES = 1 << 30  # random inputs for --check / --verify-passes, all together
EXACT_MIN_COSINE, LOSSY_MIN_COSINE = 0.999, 0.9


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
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    p.add_argument("--version", action="version", version=f"%(prog)s (graphopt) {_version()}")
    p.add_argument("model", nargs="?", metavar="MODEL.onnx", help="the ONNX model to optimize (never modified)")
    p.add_argument("-o", "--output", metavar="OUT.onnx", help="where to write the optimized model")
    p.add_argument("-p", "--pass", dest="passes", action="append", default=[], metavar="PASS",
                   help='a pass to run, in order (repeatable); options as "name:opt=value,opt2=value", a list '
                        'as a,b or [a,b], a mapping as {key:value,key2:value2}')
    p.add_argument("--list-passes", action="store_true", help="list the registered passes and exit")
    p.add_argument("--explain", metavar="PASS", help="show a pass's options and what it rewrites, and exit")
    p.add_argument("--calib", metavar="FILE.npz", help="calibration inputs: one array per model input name "
                   "(an extra leading axis holds several samples)")
    p.add_argument("--check", action="store_true", help="run the input and output models in ONNX Runtime on the "
                   "calibration (or random) inputs: max abs error, cosine similarity, latency ratio; fails the "
                   "command (exit 1, nothing written) when the outputs differ by more than --atol / --min-cosine")
    p.add_argument("--atol", type=float, default=None, metavar="X",
                   help="--check: largest max abs error accepted, relative to max(1, largest |output|) (default: "
                        "the passes' own tolerances added up, at least 1e-4; no limit when a pass is lossy)")
    p.add_argument("--min-cosine", type=float, default=None, metavar="C",
                   help=f"--check: smallest cosine similarity accepted (default {EXACT_MIN_COSINE}, or "
                        f"{LOSSY_MIN_COSINE} when a pass is lossy)")
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
    g.add_argument("-q", "--quiet", action="store_true", help="print no table or progress, only errors")
    g.add_argument("-v", "--verbose", action="store_true", help="every pass note in full (the table shows a summary)")
    return p


_EPILOG = """examples:
  opt-cli --demo --check                                  the built-in small ViT, checked in ONNX Runtime
  opt-cli model.onnx -o out.onnx -p cse -p dce            clean up a model
  opt-cli model.onnx -o out.onnx -p "token_merge:r=8" --check --report report.html
  opt-cli model.onnx -o out.onnx --calib calib.npz -p integer_only
  opt-cli model.onnx -o out.onnx -p "low_rank:ranks={blocks.0.*:16,blocks.1.*:8}"
  opt-cli --list-passes                                   every pass, what it does
  opt-cli --explain low_rank                              a pass's options

pass options: "name:opt=value,opt2=value"; a list is a,b or [a,b]; a mapping {key:value,key2:value2}
(quote the whole -p argument for the shell).

exit status: 0 done, 1 a pass, the lowering or the --check failed, 2 bad input or usage."""


def _version() -> str:
    from graphopt import __version__

    return __version__


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
        line = f"opt-cli: error: {message}"
        print(f"\033[31m{line}\033[0m" if sys.stderr.isatty() else line, file=sys.stderr)  # red on a terminal
        return code


def _classify(error: BaseException) -> tuple[int, str]:
    from graphopt.backends import LoweringError
    from graphopt.frontends import ExportError, FrontendError
    from graphopt.ir.interpreter import InterpreterError
    from graphopt.passes import PassConfigError, PassError

    text = _one_line(error)
    if isinstance(error, CliError):
        return error.code, text
    if isinstance(error, (FrontendError, PassConfigError)):
        return EXIT_USAGE, text
    if isinstance(error, PassError):
        return EXIT_FAILED, text
    if isinstance(error, (LoweringError, ExportError, InterpreterError)):
        return EXIT_FAILED, text
    return EXIT_FAILED, f"internal error: {type(error).__name__}: {text} (run with --debug for the traceback)"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


# =============================================================================================
# Progress
# =============================================================================================
class Progress:
    """A spinner and a done line per step on a terminal (stderr); off a terminal a plain line per finished
    step on stdout, so stderr keeps the one-line error contract. Records step times."""

    def __init__(self, enabled: bool):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled
        self.terminal = self.console.is_terminal
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, text: str, key: str | None = None):
        start = time.perf_counter()
        if self.enabled and self.terminal:
            with self.console.status(text + " ..."):
                yield
        else:
            yield
        seconds = time.perf_counter() - start
        self.timings[key or text] = round(self.timings.get(key or text, 0.0) + seconds, 4)
        if self.enabled and self.terminal:
            self.console.print(f"[green]done[/green] {text} [dim]({seconds:.1f} s)[/dim]", highlight=False)
        elif self.enabled:
            print(f"opt-cli: {text}: done ({seconds:.1f} s)", flush=True)


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

    specs = [make_spec(p, LISTING) for p in args.passes]  # bad pass names and options fail before any work
    dims = _parse_dims(args.dim)
    inputs = [p for p in (args.model, args.calib) if p]
    output = _check_output_path(args.output, inputs, args.force, (".onnx",), "output")
    report_path = _check_output_path(args.report, inputs, args.force, (".json", ".html", ".htm"), "report")
    if output is not None and args.external_data:
        _check_output_path(output + ".data", inputs, args.force, (".data",), "external data")
    _refuse_same_target([output, output + ".data" if output and args.external_data else None, report_path])
    progress = Progress(enabled=not args.quiet and not args.why_not)  # --why-not prints its answer only

    before, graph, source = _load(args, progress)
    _refuse_input_overlap([output, output + ".data" if output else None, report_path], before.data_files)

    feeds, input_note, calibration = _inputs(args, graph, dims, before.example)
    graph_before = graph
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

    with _Staging() as staging:
        with progress.step("writing ONNX" if output else "lowering to ONNX", "lower"):
            proto_out = to_onnx(graph, opset=args.opset)
            after = _describe(proto_out)
            written, staged_model = [], None
            if output is not None:
                staged_model = staging.stage(output)
                staged = write_model(proto_out, staged_model, external_data=True if args.external_data else None)
                written = [os.path.join(os.path.dirname(output), os.path.basename(p)) for p in staged]
                for final, temp in zip(written[1:], staged[1:]):  # a side data file written for the 2 GB limit
                    _check_output_path(final, inputs + before.data_files, args.force, (".data",), "external data")
                    staging.adopt(final, temp)
                after.path = output
                after.file_bytes = sum(os.path.getsize(p) for p in staged)
                after.sha256 = _sha256_file(staged_model)
            else:
                after.file_bytes = proto_out.ByteSize()

        check = None
        if args.check:
            check = _check(before, proto_out, staged_model, feeds, args, specs, progress,
                           graph.meta.get("leading_tokens_kept"))

        summary = {"source": source, "input": before, "output": after, "passes": [str(s) for s in specs],
                   "pipeline": pipeline, "check": check, "inputs": input_note, "timings": progress.timings,
                   "written": written, "verbose": args.verbose, "graph_before": graph_before, "graph_after": graph,
                   "dims": dims}
        if not args.quiet:
            _print_summary(summary)
        if check is not None and not check["passed"]:
            raise CliError(f"--check failed: {check['verdict']}; nothing was written", EXIT_FAILED)
        if report_path is not None:
            if report_path in written:
                written.remove(report_path)
            summary["written"] = written + [report_path]
            _write_report(staging.stage(report_path), summary)
        staging.commit()
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
        first = _first_paragraph(info.description)
        tol = "lossy" if info.tolerance is None else f"<= {info.tolerance:g}"
        table.add_row(name, first, tol)
    Console().print(table)
    return EXIT_OK


def _first_paragraph(description: str) -> str:
    """A docstring's first paragraph as one line (its first line alone can stop mid-sentence)."""
    return " ".join(description.split("\n\n")[0].split())


def _explain(name: str) -> int:
    import importlib

    from graphopt.passes import get_pass, pass_help

    info = get_pass(name, LISTING)  # unknown names raise PassConfigError with a suggestion (exit 2)
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
def _check_output_path(path, inputs, force, suffixes, what) -> str | None:
    """A file the command will write: never one of ``inputs`` (whatever path leads to it), never an
    existing file without --force, never something that is not a regular file."""
    if path is None:
        return None
    full = os.path.abspath(path)
    if not full.lower().endswith(suffixes):
        raise CliError(f"{what} file {path} must end in {' or '.join(suffixes)}")
    for source in inputs:
        if _same_file(full, source):
            raise CliError(f"refusing to overwrite the input file {source} with the {what}; choose another {what} file")
    if os.path.isdir(full):
        raise CliError(f"{what} path {path} is a directory")
    if not os.path.isdir(os.path.dirname(full)):
        raise CliError(f"{what} folder {os.path.dirname(full)} does not exist")
    if os.path.lexists(full) and not force:
        raise CliError(f"{what} file {path} already exists; pass --force to replace it")
    if os.path.exists(full) and not os.path.isfile(full):
        raise CliError(f"{what} path {path} is not a regular file")
    return full


def _same_file(a, b) -> bool:
    """The same file by any path (symbolic or hard links, relative or absolute spellings)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _refuse_same_target(paths) -> None:
    paths = [p for p in paths if p]
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            if _same_file(a, b):
                raise CliError(f"two outputs of this command would both be written to {a}; choose different paths")


def _refuse_input_overlap(paths, data_files) -> None:
    for path in paths:
        for data in data_files or ():
            if path and _same_file(path, data):
                raise CliError(f"refusing to write {path}: the input model reads its weights from that file")


class _Staging:
    """Files the command writes go to temp files next to their final places and are moved there by
    ``commit()`` only; leaving the block in any other way removes them."""

    def __init__(self):
        self.moves: list[tuple[str, str]] = []  # (temp, final), in commit order
        self.folders: list[str] = []

    def __enter__(self):
        return self

    def stage(self, final: str) -> str:
        folder = tempfile.mkdtemp(prefix=".graphopt-", dir=os.path.dirname(os.path.abspath(final)))
        self.folders.append(folder)
        temp = os.path.join(folder, os.path.basename(final))
        self.moves.append((temp, final))
        return temp

    def adopt(self, final: str, temp: str) -> None:
        """A file written into a staged folder by someone else (a model's side data), moved before the model."""
        self.moves.insert(0, (temp, final))

    def commit(self) -> None:
        for temp, final in self.moves:
            os.replace(temp, final)
        self.moves = []

    def __exit__(self, *exc):
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        return False


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
    from graphopt.frontends.onnx import check_external_data, from_onnx, load_external, load_model
    from graphopt.frontends import FrontendError

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
        try:
            graph = from_onnx(proto, name=os.path.splitext(os.path.basename(path))[0])
        except FrontendError:
            raise
        except Exception as e:  # a model onnx's own checker refuses is malformed input, not our bug
            from graphopt.frontends.onnx.load import diagnose

            problem = diagnose(proto)
            if problem is None:
                raise
            raise CliError(f"{path}: malformed model: {problem}") from e
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
    """Feeds (name -> numpy) for --check and --verify-passes; calibration samples when --calib is given.
    Random feeds are made only when something runs the model, and refused over MAX_RANDOM_INPUT_BYTES."""
    import numpy as np

    if args.calib:
        samples = _read_calib(args.calib, graph)
        note = {"source": f"calibration file {args.calib}", "samples": len(samples),
                "shapes": {k: list(v.shape) for k, v in samples[0].items()}}
        return samples[0], note, samples
    if example is not None and not dims:
        note = {"source": "the example's inputs", "shapes": {k: list(v.shape) for k, v in example.items()}}
        return example, note, None
    bindings, used = _bind_dims(graph, dims)
    shapes = {value.name: [_evaluate(d, bindings) for d in value.type.shape] for value in graph.inputs}
    if not (args.check or args.verify_passes):
        return None, {"source": "none (nothing runs the model)", "dims": used, "shapes": shapes}, None
    total, largest = 0, None
    for value in graph.inputs:
        size = math.prod(shapes[value.name]) * value.type.dtype.itemsize
        total += size
        if largest is None or size > largest[1]:
            largest = (value.name, size)
    if total > MAX_RANDOM_INPUT_BYTES:
        raise CliError(f"random inputs for --check / --verify-passes would take {_human_bytes(total)} (input "
                       f"'{largest[0]}' is {shapes[largest[0]]}); the limit is {_human_bytes(MAX_RANDOM_INPUT_BYTES)}: "
                       "set smaller symbolic dims with --dim, or give inputs with --calib")
    rng = np.random.default_rng(args.seed)
    feeds = {value.name: _random_input(value, shapes[value.name], graph, rng) for value in graph.inputs}
    note = {"source": f"random (seed {args.seed})", "dims": used, "shapes": shapes}
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
    """The dim's size; substitutes only the dim's own symbols (all of them per dim would be quadratic)."""
    if isinstance(dim, int):
        return dim
    own = {s: bindings[s] for s in dim.free_symbols}
    value = own[dim] if dim.is_Symbol else dim.xreplace(own)
    if not getattr(value, "is_Integer", isinstance(value, int)) or int(value) < 0:
        given = ", ".join(f"{s}={v}" for s, v in sorted(own.items(), key=lambda kv: kv[0].name))
        raise CliError(f"input dim {dim} does not evaluate to a size with {given}; set it with --dim")
    return int(value)


def _random_input(value, shape, graph, rng):
    import numpy as np
    import torch

    dtype = value.type.dtype
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype if dtype is not torch.bfloat16 else np.float32
    name = value.name.lower()
    if dtype.is_floating_point:
        return rng.standard_normal(shape, dtype=np.float32).astype(np_dtype, copy=False)
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
    flat = tuple(torch.from_numpy(feeds[v.name]) for v in graph.inputs) if feeds is not None else None
    calib = [tuple(torch.from_numpy(s[v.name]) for v in graph.inputs) for s in calibration] if calibration else None
    for i, spec in enumerate(specs, 1):
        with progress.step(f"pass {i}/{len(specs)}: {spec}", f"pass:{spec}"):
            graph, report = PassManager([spec], example_inputs=flat, calibration=calib,
                                        check=verify and flat is not None).run(graph, report)
    return graph, report


# ---- --check -----------------------------------------------------------------------------------
# ONNX Runtime runs in a child process: a crash inside it (it segfaults on some valid models) must end
# in one line naming the model, not take opt-cli down. The child imports only onnxruntime and numpy.
_ORT_CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort

folder = sys.argv[1]
cfg = json.load(open(folder + "/config.json"))

def stage(text):
    with open(folder + "/stage.txt", "w") as f:
        f.write(text)

def session(path):
    options = ort.SessionOptions()
    if cfg["threads"] is not None:
        options.intra_op_num_threads = cfg["threads"]
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg["level"])
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

try:
    stage("loading the input model")
    s_in = session(cfg["input"])
    stage("loading the output model")
    s_out = session(cfg["output"])
    with np.load(folder + "/feeds.npz", allow_pickle=False) as data:
        feeds = {k: data[k] for k in data.files}
    sides = {}
    for side, sess in (("in", s_in), ("out", s_out)):
        names = {i.name for i in sess.get_inputs()}
        sides[side] = (sess, {k: v for k, v in feeds.items() if k in names})
    stage("running the input model")
    ref = sides["in"][0].run(None, sides["in"][1])
    stage("running the output model")
    got = sides["out"][0].run(None, sides["out"][1])
    stage("timing both models")
    times = {"in": [], "out": []}
    runs, warmup = cfg["runs"], cfg["warmup"]
    first = (runs + 1) // 2
    # blocks in the order in, out, out, in: load drift hits both models alike
    for side, count in (("in", first), ("out", first), ("out", runs - first), ("in", runs - first)):
        sess, side_feeds = sides[side]
        for _ in range(warmup if count else 0):
            sess.run(None, side_feeds)
        for _ in range(count):
            start = time.perf_counter()
            sess.run(None, side_feeds)
            times[side].append(time.perf_counter() - start)
    np.savez(folder + "/ref.npz", *[np.asarray(a) for a in ref])
    np.savez(folder + "/got.npz", *[np.asarray(a) for a in got])
    result = {"times": times, "names_in": [o.name for o in s_in.get_outputs()],
              "names_out": [o.name for o in s_out.get_outputs()]}
except Exception as e:
    text = str(e).strip()
    result = {"error": text.splitlines()[0] if text else type(e).__name__}
with open(folder + "/stage.txt") as f:
    result["stage"] = f.read()
with open(folder + "/result.json", "w") as f:
    json.dump(result, f)
"""

_ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


def _run_ort_child(before: ModelSide, proto_out, staged_model, feeds, args) -> dict:
    """Run and time both models in a child process; returns its result (outputs as numpy lists)."""
    import numpy as np

    from graphopt.backends.onnxruntime_backend import write_model

    with tempfile.TemporaryDirectory(prefix="graphopt-check-") as folder:
        source = before.path
        if source is None:
            source = os.path.join(folder, "input.onnx")
            write_model(before.proto, source)
        target = staged_model
        if target is None:
            target = os.path.join(folder, "output.onnx")
            write_model(proto_out, target)
        config = {"input": source, "output": target, "threads": args.threads, "level": _ORT_LEVELS[args.opt_level],
                  "runs": args.runs, "warmup": args.warmup}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        np.savez(os.path.join(folder, "feeds.npz"), **feeds)
        # -P: no current-folder entry on sys.path, so a stray numpy.py there cannot shadow the real one
        done = subprocess.run([sys.executable, "-P", "-c", _ORT_CHILD, folder], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stage_file = os.path.join(folder, "stage.txt")
        stage = open(stage_file).read() if os.path.exists(stage_file) else "starting"
        if done.returncode < 0:
            try:
                name = signal.Signals(-done.returncode).name
            except ValueError:
                name = f"signal {-done.returncode}"
            raise CliError(f"--check: ONNX Runtime crashed ({name}) while {stage}; this is a bug in ONNX Runtime "
                           "on this model, the graphopt result was not checked and nothing was written", EXIT_FAILED)
        result_file = os.path.join(folder, "result.json")
        if done.returncode != 0 or not os.path.exists(result_file):
            last = done.stderr.decode(errors="replace").strip().splitlines()
            raise CliError(f"--check: the ONNX Runtime process failed while {stage}: "
                           f"{last[-1] if last else f'exit status {done.returncode}'}", EXIT_FAILED)
        with open(result_file) as f:
            result = json.load(f)
        if "error" in result:
            raise CliError(f"--check: onnxruntime failed while {result['stage']}: {result['error']}", EXIT_FAILED)
        for side in ("ref", "got"):
            with np.load(os.path.join(folder, f"{side}.npz"), allow_pickle=False) as data:
                result[side] = [data[f"arr_{i}"] for i in range(len(data.files))]
    return result


def check_limits(specs, atol, min_cosine) -> tuple[float, float, bool]:
    """(atol, min cosine, lossy): the user's, else from the passes' tolerances (lossy ones allow any error)."""
    tolerances = [spec.info.tolerance for spec in specs]
    lossy = any(t is None for t in tolerances)
    if atol is None:
        atol = math.inf if lossy else max(1e-4, sum(tolerances))
    if min_cosine is None:
        min_cosine = LOSSY_MIN_COSINE if lossy else EXACT_MIN_COSINE
    return atol, min_cosine, lossy


def _comparable(name: str, a, b, leading: int | None):
    """The parts of one output pair that can be compared element-wise, and why the rest cannot. A token pass
    changes the token axis' length: only the leading tokens it keeps in place (CLS) still line up."""
    if a.shape == b.shape:
        return a, b, None
    changed = [i for i in range(a.ndim) if a.ndim == b.ndim and a.shape[i] != b.shape[i]]
    why = f"shape {list(a.shape)} -> {list(b.shape)}"
    if len(changed) != 1 or leading is None:
        return None, None, f"{why}: not comparable element-wise"
    axis = changed[0]
    why += f" (tokens merged or dropped along axis {axis})"
    if not leading:
        return None, None, f"{why}: no token stays in place to compare (no leading special token)"
    index = (slice(None),) * axis + (slice(0, leading),)
    return a[index], b[index], f"{why}: compared on the {leading} leading token(s) kept in place (CLS); the rest " \
                               "are merged or dropped"


def _check(before: ModelSide, proto_out, staged_model, feeds, args, specs, progress, leading_tokens=None) -> dict:
    import numpy as np

    with progress.step(f"ONNX Runtime: both models, {args.warmup} warm-up + {args.runs} timed runs each", "check"):
        result = _run_ort_child(before, proto_out, staged_model, feeds, args)
    ref, got = result["ref"], result["got"]
    out_names_in, out_names_out = result["names_in"], result["names_out"]
    t_in, t_out = result["times"]["in"], result["times"]["out"]
    if len(out_names_out) != len(out_names_in):
        raise CliError(f"--check: the input model has {len(out_names_in)} outputs, the output model "
                       f"{len(out_names_out)}", EXIT_FAILED)
    pairs = []
    for i, name in enumerate(out_names_in):
        j = out_names_out.index(name) if name in out_names_out else i
        if j < len(got):
            pairs.append((name, np.asarray(ref[i]), np.asarray(got[j])))
    per_output, worst, scale = {}, 0.0, 1.0
    dots = norm_a = norm_b = 0.0
    for name, a_full, b_full in pairs:
        a, b, why = _comparable(name, a_full, b_full, leading_tokens)
        if a is None:
            per_output[name] = {"max_abs_error": None, "compared": why}
            continue
        a64, b64 = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
        nan_a, nan_b = np.isnan(a64), np.isnan(b64)
        diff = np.abs(a64 - b64)
        diff[nan_a & nan_b] = 0.0
        diff[nan_a != nan_b] = np.inf
        err = float(np.max(diff)) if diff.size else 0.0
        per_output[name] = {"max_abs_error": err} if why is None else {"max_abs_error": err, "compared": why}
        worst = max(worst, err)
        finite = np.isfinite(a64)
        if finite.any():
            scale = max(scale, float(np.max(np.abs(a64[finite]))))
        a64, b64 = np.nan_to_num(a64), np.nan_to_num(b64)
        dots += float(a64 @ b64)
        norm_a += float(a64 @ a64)
        norm_b += float(b64 @ b64)
    cosine = dots / math.sqrt(norm_a * norm_b) if norm_a > 0 and norm_b > 0 else (1.0 if norm_a == norm_b else 0.0)
    atol, min_cosine, lossy = check_limits(specs, args.atol, args.min_cosine)
    limit = atol * scale
    problems = []
    if all(o["max_abs_error"] is None for o in per_output.values()):
        problems.append("no output can be compared: " + "; ".join(f"{n}: {o['compared']}" for n, o in per_output.items()))
    if not worst <= limit:
        problems.append(f"max abs error {worst:.3g} > {limit:.3g} (--atol {atol:g} x output scale {scale:.3g})")
    if not cosine >= min_cosine:
        problems.append(f"cosine similarity {cosine:.6f} < {min_cosine:g} (--min-cosine)")
    passed = not problems
    verdict = "; ".join(problems) if problems else (
        f"max abs error {worst:.3g} <= {limit:.3g}, cosine {cosine:.6f} >= {min_cosine:g}")
    med_in, med_out = statistics.median(t_in), statistics.median(t_out)
    return {"max_abs_error": worst, "cosine": cosine, "outputs": per_output, "passed": passed, "verdict": verdict,
            "atol": atol, "output_scale": scale, "min_cosine": min_cosine, "lossy_passes": lossy,
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
        for name, o in check["outputs"].items():
            if "compared" in o:
                t.add_row(f"output {name}", o["compared"])
        t.add_row("latency before", f"{check['latency_before_ms']:.2f} ms")
        t.add_row("latency after", f"{check['latency_after_ms']:.2f} ms")
        t.add_row("latency ratio (after / before)", f"{check['latency_ratio']:.3f}x")
        t.add_row("result", "[green]passed[/green]" if check["passed"] else f"[bold red]FAILED: {check['verdict']}[/bold red]")
        tables.append(t)
    pipeline = summary["pipeline"]
    if pipeline.passes:
        tables.insert(0, pipeline.table(verbose=summary.get("verbose", False)))
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
    from graphopt.ir.files import atomic_write
    from graphopt.passes.report import json_safe

    data = report_dict(summary)
    if path.lower().endswith(".json"):
        text = json.dumps(json_safe(data), indent=2, allow_nan=False, default=str)
    else:
        text = _html_report(summary, data)
    atomic_write(path, text.encode())


def _html_report(summary, data) -> str:
    """The HTML page: the pipeline's report plus the cost model's figures and a block drawing, before and after."""
    from graphopt.ir.cost import graph_cost
    from graphopt.passes.report_html import render_html

    pipeline = summary["pipeline"]
    pipeline.cost_before, pipeline.cost_after = graph_cost(summary["graph_before"]), graph_cost(summary["graph_after"])
    return render_html(pipeline, title=f"graphopt report: {data['source']}",
                       intro=f"passes: {', '.join(data['passes']) or '(none)'}; inputs: {data['inputs'].get('source')}",
                       check=summary["check"], models={"input": data["input"], "output": data["output"]},
                       graph_before=summary["graph_before"], graph_after=summary["graph_after"],
                       cost_dims=summary["dims"] or None,
                       files={"output model": data["output"]["path"]} if data["output"]["path"] else None)


if __name__ == "__main__":
    sys.exit(main())
