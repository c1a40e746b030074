"""opt-cli's command line and the run: arguments checked, outputs checked before any work, the model
loaded, the passes run, the result lowered to ONNX, checked in ONNX Runtime, reported, and only then
moved into place (see the package docstring for the guarantees)."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import traceback

from graphopt.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, check, one_line, report
from graphopt.cli.inputs import model_inputs, parse_dims
from graphopt.cli.load import describe, load
from graphopt.cli.outputs import Staging, check_output_path, refuse_input_overlap, refuse_same_target, sha256_file
from graphopt.progress import showing, task

LISTING = "opt-cli --list-passes"  # what an unknown-pass error tells a CLI user to run
CUSTOM_DOMAIN = "ai.graphopt.cpu_integer"  # backends/onnx/cpu_integer_ops.DOMAIN (not imported: --help stays light)
LIBRARY_SUFFIX = ".graphopt_ops.so"  # --ort-custom-ops: OUT.onnx -> OUT.graphopt_ops.so


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
                   help=f"--check: smallest cosine similarity accepted (default {check.EXACT_MIN_COSINE}, or "
                        f"{check.LOSSY_MIN_COSINE} when a pass is lossy)")
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
    g.add_argument("--runs", type=int, default=20, help="timed runs per model for --check, the two models in turn, "
                   "each timed run after an untimed one (default 20)")
    g.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs per model for --check (default 3)")
    g.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own choice); with "
                   "--ort-custom-ops also the kernels' threads, written into the model (default: the library's)")
    g.add_argument("--opt-level", default="all", choices=["disable", "basic", "extended", "all"],
                   help="ONNX Runtime graph optimization level for --check (default all)")
    g.add_argument("--verify-passes", action="store_true",
                   help="check every pass numerically against the graph before it (torch reference backend)")
    g.add_argument("--opset", type=int, default=None, help="ai.onnx opset to write (default: the input's)")
    g.add_argument("--external-data", action="store_true", help="write the weights to OUT.onnx.data next to the output")
    g.add_argument("--ort-custom-ops", action="store_true",
                   help="write the integer graph (-p integer_only) with graphopt's fused cpu_integer kernels as ONNX "
                        f"Runtime custom ops (domain {CUSTOM_DOMAIN}) and their compiled library next to the output "
                        f"(OUT{LIBRARY_SUFFIX}): load it with SessionOptions.register_custom_ops_library, or open the "
                        "model with graphopt.backends.onnxruntime_backend.custom_ops_session. Such a model runs only "
                        "where that library loads; the default output uses standard ONNX ops only and runs in any "
                        "ONNX Runtime")
    g.add_argument("-q", "--quiet", action="store_true", help="print no table or progress, only errors")
    g.add_argument("-v", "--verbose", action="store_true", help="every pass note in full (the table shows a summary)")
    return p


_EPILOG = """examples:
  opt-cli --demo --check                                  the built-in small ViT, checked in ONNX Runtime
  opt-cli model.onnx -o out.onnx -p cse -p dce            clean up a model
  opt-cli model.onnx -o out.onnx -p "token_merge:r=8" --check --report report.html
  opt-cli model.onnx -o out.onnx --calib calib.npz -p integer_only
  opt-cli model.onnx -o out.onnx --calib calib.npz -p integer_only --ort-custom-ops
                                                          the same, with graphopt's integer kernels as ONNX Runtime
                                                          custom ops (library written to out.graphopt_ops.so)
  opt-cli model.onnx -o out.onnx -p "low_rank:ranks={blocks.0.*:16,blocks.1.*:8}"
  opt-cli --list-passes                                   every pass, what it does
  opt-cli --explain low_rank                              a pass's options

pass options: "name:opt=value,opt2=value"; a list is a,b or [a,b]; a mapping {key:value,key2:value2}
(quote the whole -p argument for the shell).

exit status: 0 done, 1 a pass, the lowering or the --check failed, 2 bad input or usage."""


def _version() -> str:
    from graphopt import __version__

    return __version__


def _terminated(signum, frame):
    """SIGTERM (a job's timeout, `kill`): unwind like Ctrl-C, so staged outputs are removed."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return run(args)
    except KeyboardInterrupt:
        print("opt-cli: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        if e.code != 128 + signal.SIGTERM:
            raise
        print("opt-cli: terminated", file=sys.stderr)
        return e.code
    except Exception as e:  # every failure becomes one line (and the traceback with --debug)
        code, message = _classify(e)
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        line = f"opt-cli: error: {message}"
        print(f"\033[31m{line}\033[0m" if sys.stderr.isatty() else line, file=sys.stderr)  # red on a terminal
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _classify(error: BaseException) -> tuple[int, str]:
    from graphopt.backends import LoweringError
    from graphopt.frontends import ExportError, FrontendError
    from graphopt.ir.interpreter import InterpreterError
    from graphopt.passes import CalibrationMissing, PassConfigError, PassError

    text = one_line(error)
    if isinstance(error, CliError):
        return error.code, text
    if isinstance(error, (FrontendError, PassConfigError, CalibrationMissing)):
        return EXIT_USAGE, text
    if isinstance(error, PassError):
        return EXIT_FAILED, text
    if isinstance(error, (LoweringError, ExportError, InterpreterError)):
        return EXIT_FAILED, text
    return EXIT_FAILED, f"internal error: {type(error).__name__}: {text} (run with --debug for the traceback)"


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
    if args.ort_custom_ops and "integer_only" not in [s.name for s in specs]:
        raise CliError("--ort-custom-ops writes the fused kernels of an integer graph: add -p integer_only (calibrated "
                       "with --calib)")
    dims = parse_dims(args.dim)
    inputs = [p for p in (args.model, args.calib) if p]
    output = check_output_path(args.output, inputs, args.force, (".onnx",), "output")
    report_path = check_output_path(args.report, inputs, args.force, (".json", ".html", ".htm"), "report")
    if output is not None and args.external_data:
        check_output_path(output + ".data", inputs, args.force, (".data",), "external data")
    library = None
    if output is not None and args.ort_custom_ops:
        library = check_output_path(os.path.splitext(output)[0] + LIBRARY_SUFFIX, inputs, args.force, (".so",),
                                    "custom-op library")
    refuse_same_target([output, output + ".data" if output and args.external_data else None, report_path, library])
    with Staging() as staging:
        with showing(not args.quiet and not args.why_not, _progress_console(), name="opt-cli") as timings:
            before, graph, source = load(args)
            refuse_input_overlap([output, output + ".data" if output else None, report_path], before.data_files)
            feeds, input_note, calibration = model_inputs(args, graph, dims, before.example)
            graph_before = graph
            graph, pipeline = _run_passes(graph, specs, feeds, calibration, args.verify_passes)
            if args.why_not:  # its answer only: no progress (turned off above), no tables
                print(_why_not(graph, args.why_not))
                return EXIT_OK
            proto_out, after, written, staged_model = _lower(graph, args, output, inputs + before.data_files, staging)
            custom_ops = _custom_ops_library(library, staging, written) if args.ort_custom_ops else None
            check_result = None
            if args.check:
                check_result = check.check(before, proto_out, staged_model, feeds, args, specs,
                                           graph.meta.get("leading_tokens_kept"), custom_ops,
                                           graph.meta.get("positions_kept_by_mask"))
        summary = {"source": source, "input": before, "output": after, "passes": [str(s) for s in specs],
                   "pipeline": pipeline, "check": check_result, "inputs": input_note, "timings": timings,
                   "written": written, "verbose": args.verbose, "graph_before": graph_before, "graph_after": graph,
                   "dims": dims, "custom_ops_library": library or custom_ops}
        if not args.quiet:
            report.print_summary(summary)
        if check_result is not None and not check_result["passed"]:
            raise CliError(f"--check failed: {check_result['verdict']}; nothing was written", EXIT_FAILED)
        if report_path is not None:
            if report_path in written:
                written.remove(report_path)
            summary["written"] = written + [report_path]
            report.write_report(staging.stage(report_path), summary)
        staging.commit()
    return EXIT_OK


def _progress_console():
    """Progress goes live to stderr on a terminal; otherwise as plain lines to stdout, so that stderr
    holds nothing but the one-line error."""
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else Console()


def _why_not(graph, name: str) -> str:
    from graphopt.ir.rewrite import get_rule, why_not
    from graphopt.passes import list_passes

    list_passes()  # loads the built-in rule sets
    try:
        rule = get_rule(name)
    except KeyError as e:
        raise CliError(str(e).strip('"')) from None
    return why_not(graph, rule)


def _lower(graph, args, output, inputs, staging):
    """(the ONNX model, its side, the files written, the staged model path): the graph lowered to ONNX
    and, with -o, written to a staged file (a side data file past the 2 GB limit checked like the output)."""
    from graphopt.backends.onnx import to_onnx
    from graphopt.backends.onnxruntime_backend import write_model

    with task("writing ONNX" if output else "lowering to ONNX", key="lower"):
        if args.ort_custom_ops:
            from graphopt.backends.onnx.cpu_integer_ops import to_onnx_custom_ops

            proto_out = to_onnx_custom_ops(graph, threads=args.threads or 0, opset=args.opset)
        else:
            proto_out = to_onnx(graph, opset=args.opset)
        after = describe(proto_out)
        written, staged_model = [], None
        if output is not None:
            staged_model = staging.stage(output)
            staged = write_model(proto_out, staged_model, external_data=True if args.external_data else None)
            written = [os.path.join(os.path.dirname(output), os.path.basename(p)) for p in staged]
            for final, temp in zip(written[1:], staged[1:]):  # a side data file written for the 2 GB limit
                check_output_path(final, inputs, args.force, (".data",), "external data")
                staging.adopt(final, temp)
            after.path = output
            after.file_bytes = sum(os.path.getsize(p) for p in staged)
            after.sha256 = sha256_file(staged_model)
        else:
            after.file_bytes = proto_out.ByteSize()
    return proto_out, after, written, staged_model


def _custom_ops_library(final, staging, written) -> str:
    """The custom-op library (built, or taken from the cache); with -o a copy is staged to go next to the
    output. Returns the cached library's path (what --check loads)."""
    from graphopt.backends import ort_custom_ops

    with task("building the ONNX Runtime custom-op library", key="custom_ops"):
        cached = ort_custom_ops.library_path()
    if final is not None:
        shutil.copyfile(cached, staging.stage(final))
        written.append(final)
    return cached


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


# ---- passes ------------------------------------------------------------------------------------
def _run_passes(graph, specs, feeds, calibration, verify):
    """The passes in order (the pass manager shows each as a step); with --verify-passes each is checked
    numerically against the graph before it."""
    import torch

    from graphopt.passes import PassManager

    flat = tuple(torch.from_numpy(feeds[v.name]) for v in graph.inputs) if feeds is not None else None
    calib = [tuple(torch.from_numpy(s[v.name]) for v in graph.inputs) for s in calibration] if calibration else None
    return PassManager(specs, example_inputs=flat, calibration=calib, check=verify and flat is not None).run(graph)
