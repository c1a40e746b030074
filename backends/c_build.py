"""Compiling the C kernels (``cpu_integer_kernels.c``, ``cpu_sparse_kernels.c``) with the system C
compiler: once per source (with the headers beside it), flags, compiler and CPU, cached under
``~/.cache/graphopt/<name>`` (``GRAPHOPT_CACHE`` moves it), built in a temporary file and moved into place,
so a crashed or concurrent build never leaves a half-written library behind."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from graphopt.progress import task

# -fopenmp stays: the fp32 SpMM of cpu_sparse_kernels.c and bench/vnni_peak.c use OpenMP (ort_custom_ops.py drops
# it). The cpu_integer sources and the int8 SpMM run on go_pool.h.
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]


class KernelBuildError(RuntimeError):
    pass


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((line for line in info.splitlines() if line.startswith("flags")), "") + platform.processor()
    except OSError:
        return platform.processor()


def compiler() -> str:
    if os.environ.get("CC"):
        cc = shutil.which(os.environ["CC"])
        if not cc:
            raise KernelBuildError(f"CC={os.environ['CC']} is not a C compiler on this machine; graphopt's CPU "
                                   "kernels are compiled with one (unset CC to use cc/gcc/clang from PATH)")
        return cc
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise KernelBuildError("graphopt's CPU kernels (cpu_integer, sparse) are compiled with a C compiler, and none "
                               "was found (install gcc or set CC); the onnxruntime backend runs the same graphs")
    return cc


def load(source: Path, name: str, what: str, flags: list[str] = FLAGS) -> ctypes.CDLL:
    """``source`` compiled (or taken from the cache) and loaded; ``what`` names it in progress and errors."""
    cc = compiler()
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))   # what it may #include
    key = hashlib.sha256(source.read_bytes() + headers + " ".join([cc] + flags).encode()
                         + _cpu_id().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("GRAPHOPT_CACHE", Path.home() / ".cache" / "graphopt")) / name
    path = cache / f"kernels-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / path.name
            with task(f"compiling {what} with {Path(cc).name} (once; cached in {cache})"):
                proc = subprocess.run([cc, *flags, str(source), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode:
                raise KernelBuildError(f"compiling {source.name} with {cc} failed:\n{proc.stderr[-2000:]}")
            os.replace(out, path)
    lib = _Library(str(path))
    _share_pool(lib)
    return lib


_pool: tuple[int, int] | None = None          # (go_pool_abi, go_pool_state) of the first library with a pool
_pool_lock = threading.Lock()


def _share_pool(lib: ctypes.CDLL) -> None:
    """A library built on go_pool.h uses the helper threads of the first one loaded (same pool layout): with a pool
    each, one library's helpers spun for their next job on the cores another library's kernels were using
    (DeiT-S b8 with token merging runs three)."""
    global _pool
    if not hasattr(lib, "go_pool_state"):
        return
    previous, _recorder.record = getattr(_recorder, "record", None), None      # not part of any captured forward
    try:
        lib.go_pool_state.restype = ctypes.c_void_p
        lib.go_pool_share.argtypes, lib.go_pool_share.restype = [ctypes.c_void_p], None
        with _pool_lock:
            if _pool is None:
                _pool = (lib.go_pool_abi(), lib.go_pool_state())
            elif _pool[0] == lib.go_pool_abi():
                lib.go_pool_share(_pool[1])
    finally:
        _recorder.record = previous


_recorder = threading.local()


@contextlib.contextmanager
def capture(record):
    """While inside, every call this thread makes to a loaded library's function also calls
    ``record(function, args, result)`` (``cpu_integer_replay`` records a forward's kernels this way)."""
    previous = getattr(_recorder, "record", None)
    _recorder.record = record
    try:
        yield
    finally:
        _recorder.record = previous


class _Library(ctypes.CDLL):
    """A CDLL whose functions report their calls to this thread's ``capture``, if any."""

    def __init__(self, path: str):
        super().__init__(path)
        base = self._FuncPtr

        class Function(base):
            _flags_, _restype_ = base._flags_, base._restype_

            def __call__(self, *args):
                result = base.__call__(self, *args)
                record = getattr(_recorder, "record", None)
                if record is not None:
                    record(self, args, result)
                return result

        self._FuncPtr = Function
