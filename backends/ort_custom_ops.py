"""The ONNX Runtime custom-op library of the cpu_integer kernels (``ort_custom_ops.c``): compiled with the
system C compiler like the kernels themselves (``c_build``: once, cached), its path for
``SessionOptions.register_custom_ops_library``, and a session for a model written by
``backends.onnx.cpu_integer_ops.to_onnx_custom_ops``. Only the session needs onnxruntime.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from pathlib import Path

from graphopt.backends import LoweringError
from graphopt.backends.c_build import FLAGS, load
from graphopt.backends.cpu_integer_library import ISA_LEVELS

SOURCE = Path(__file__).with_name("ort_custom_ops.c")
KERNELS = [Path(__file__).with_name(f"cpu_integer_{part}.c") for part in ("kernels", "tokens", "edges")]


@functools.cache
def library() -> ctypes.CDLL:
    """The library, built if needed. It includes the cpu_integer kernels' C files, whose hash goes into the flags
    (the build cache keys on the flags), so a change to them rebuilds it. ``-ffp-contract=off`` as for
    cpu_integer_edges.c: the float edges round the product before the add, as the reference does. Linked
    ``-z nodelete``: the GEMM's helper threads run the library's code, so ONNX Runtime must not unmap it when a
    session closes. No ``-fopenmp``: every kernel runs on the go_pool.h pool."""
    kernels_key = hashlib.sha256(b"".join(path.read_bytes() for path in KERNELS)).hexdigest()[:16]
    lib = load(SOURCE, "ort_custom_ops", "the ONNX Runtime custom-op library",
               [f for f in FLAGS if f != "-fopenmp"] + ["-ffp-contract=off", "-fvisibility=hidden", "-Wl,-z,nodelete",
                        f"-DGO_KERNELS_SOURCE={kernels_key}"])
    lib.go_ort_set_threads.argtypes = [ctypes.c_int]
    lib.go_ort_api_version.restype = ctypes.c_int
    lib.go_ort_limit_isa.argtypes = [ctypes.c_int]
    return lib


def limit_isa(name: str) -> None:
    """Use at most this GEMM instruction set in every session of this process (``cpu_integer_library.ISA_LEVELS``;
    the library holds its own copy of the kernels, which ``cpu_integer_library.limit_isa`` does not reach)."""
    library().go_ort_limit_isa(ISA_LEVELS[name])


def library_path() -> str:
    """Where the built library is (for ``SessionOptions.register_custom_ops_library``)."""
    return library()._name


def check_onnxruntime() -> None:
    """The installed onnxruntime is new enough for the library (its C API version is the minor version)."""
    import onnxruntime as ort

    need = library().go_ort_api_version()
    major, minor = (int(p) for p in ort.__version__.split(".")[:2])
    if (major, minor) < (1, need):
        raise LoweringError(f"graphopt's ONNX Runtime custom ops need onnxruntime >= 1.{need} (C API version {need}); "
                            f"this is onnxruntime {ort.__version__}")


def session(model, *, threads: int | None = None, optimization_level: str = "all"):
    """An InferenceSession (CPU) for ``model`` (a path, bytes or ModelProto) with the library registered.
    ``threads`` sets ONNX Runtime's intra-op threads and the kernels' threads where the model leaves them
    to the library (threads=0 in the nodes, what opt-cli writes by default)."""
    import onnx
    import onnxruntime as ort

    from graphopt.backends.onnxruntime_backend import session_options

    check_onnxruntime()
    options = session_options(threads, optimization_level)
    # ONNX Runtime's idle pool threads would spin on the cores the kernels' pool threads need (measured on
    # DeiT-S, 2 cores: 1.15x cpu_integer's time with spinning, 0.88x without, machine loaded)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.register_custom_ops_library(library_path())
    if threads:
        library().go_ort_set_threads(int(threads))
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types; the first line names the problem
        text = str(e).strip()
        raise LoweringError("onnxruntime cannot load the model with graphopt's custom ops: "
                            f"{text.splitlines()[0] if text else type(e).__name__}") from e
