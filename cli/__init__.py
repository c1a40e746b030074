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

The modules: ``main`` (the command line and the run), ``load`` (the input model), ``inputs`` (the
feeds: calibration file or random), ``outputs`` (safe output paths, staged writes), ``check``
(``--check`` in an ONNX Runtime child process) and ``report`` (the tables and the report file).
"""
from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A problem with the command line or the input: one line, exit status 2 unless said otherwise."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def one_line(error: BaseException) -> str:
    """An error's message on one line (its type name when it has none)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


from graphopt.cli.main import build_parser, main  # noqa: E402  (main imports CliError from here)

__all__ = ["CliError", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main", "one_line"]
