"""The int8 GEMM of ``cpu_integer`` against the machine's VPDPBUSD peak (issue 18).

    python -m graphopt.bench.vnni_peak [--runs 15] [--isa vnni amx] [--threads 1 2] [--under-load]
    python -m graphopt.bench.vnni_peak --baseline OLD.c ...           # a second kernel build, side by side
    python -m graphopt.bench.vnni_peak --end-to-end [--baseline OLD.c] [--batch 8] [--threads 2] [--under-load]
                                       [--token-merge 16]                # token_merge r=16 first

Peak: ``bench/vnni_peak.c``, a loop of independent 512-bit VPDPBUSD accumulators that touches no memory,
on 1 and on all threads at once (GOPS counts 2 ops per multiply-add). Then ``go_gemm`` (requant epilogue,
u8 out, the weights packed once as at lowering time) on the DeiT-S GEMM shapes, batch 8 (M = 8 x 197
rows) and batch 1 (M = 197): qkv (384 -> 1152), proj (384 -> 384), fc1 (384 -> 1536), fc2 (1536 -> 384),
as GMAC/s of the best run (on a shared machine the best run is the one nobody preempted) and its fraction
of the same-thread-count peak, and the median. ``--under-load`` times each GEMM again while a second process
(numpy float matmuls on all cores) competes for the cores and reports the slowdown of the median.
Timed with ``graphopt.timing.interleaved``; results go to bench/results/vnni_peak.json.

``--baseline OLD.c`` adds the kernels built from OLD.c (e.g. ``git show main:backends/cpu_integer_kernels.c
> old.c``), interleaved with this checkout's in one process (only the library is swapped; a source with
another go_abi(), from before a kernel signature changed, is refused). ``--end-to-end``
times the lowered integer-only DeiT-S instead (both builds must give the same integers).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from graphopt.backends import c_build
from graphopt.backends import cpu_integer_library as kernels
from graphopt.timing import interleaved

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)}   # (K, N)
BUSY = "import numpy as np; a = np.random.rand(2000, 2000)\nwhile True: a @ a"


def peak_gmacs(threads: int, seconds: float = 0.005, repeats: int = 200) -> float:
    """Best of many short runs of the VPDPBUSD loop (short, so some run without being preempted on a shared
    machine), in 10^9 multiply-adds per second over all threads."""
    lib = c_build.load(Path(__file__).with_name("vnni_peak.c"), "vnni_peak", "the VNNI peak loop")
    lib.vnni_peak.restype = lib.vnni_peak_macs_per_iter.restype = c_build.ctypes.c_int64
    lib.vnni_peak.argtypes = [c_build.ctypes.c_int64, c_build.ctypes.c_int]
    per_iter = lib.vnni_peak_macs_per_iter()
    iters = 1000
    while _timed(lambda: lib.vnni_peak(iters, 1)) < seconds:   # grow until one thread's call lasts `seconds`
        iters *= 2
    best = min(_timed(lambda: lib.vnni_peak(iters, threads)) for _ in range(repeats))
    return iters * per_iter * threads / best / 1e9


def _timed(call) -> float:
    t = time.perf_counter()
    call()
    return time.perf_counter() - t


def gemm_call(m: int, k: int, n: int, threads: int):
    """A call of go_gemm on random data with a requant epilogue (u8 out), weights packed beforehand."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    packed, _ = kernels.pack_b(w)
    bias = torch.randint(-1000, 1000, (n,), dtype=torch.int32, generator=g)
    mul = torch.randint(1 << 14, 1 << 15, (n,), dtype=torch.int32, generator=g)
    add = torch.zeros(n, dtype=torch.int32)
    epi = kernels.epilogue("requant", torch.uint8, bias, pre=8, k=15, lo=-128, hi=127, zp=128, m=mul, c=add)
    out = torch.empty(m, n, dtype=torch.uint8)
    return lambda: kernels.gemm(a, packed, n, epi, out, threads)


def measure(libs: dict, isas: list[str], threads: list[int], runs: int) -> dict:
    """(best, median) seconds per (build, isa, threads, batch, gemm), the builds interleaved."""
    rows = {}
    for isa in isas:
        calls = {(build, isa, t, batch, name): _with_library(lib, isa, gemm_call(197 * batch, k, n, t))
                 for t in threads for batch in (8, 1) for name, (k, n) in SHAPES.items()
                 for build, lib in libs.items()}
        for key, timing in interleaved(calls, runs).items():
            rows[key] = min(timing.times), timing.median
    return rows


def _with_library(lib, isa: str, call):
    """call with the kernel library swapped to lib (the wrappers look it up on every call) at isa."""
    def run():
        kernels.library = lambda: lib
        lib.go_limit_isa(kernels.ISA_LEVELS[isa])
        return call()
    return run


def end_to_end(libs: dict, batch: int, threads: int, isa: str, runs: int, under_load: bool, merge_r: int = 0) -> dict:
    """Median seconds of the lowered integer-only DeiT-S (token_merge r = merge_r first, when not 0) with each
    kernel build."""
    import graphopt
    from graphopt import zoo
    from graphopt.backends.registry import lower

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=g)
    calib = [(torch.randn(batch, 3, 224, 224, generator=g),) for _ in range(2)]
    graph = graphopt.optimize(zoo.deit_small(batch).model, [], (x,)).graph
    passes = ([("token_merge", {"r": merge_r})] if merge_r else []) + [("integer_only", {"smoothquant": 0.7})]
    graph = graphopt.optimize(graph, passes, (x,), calibration=calib).graph
    # one executable per build: a replay calls the kernels it recorded, from the library in place at capture
    calls = {build: _with_library(lib, isa, functools.partial(lower(graph, "cpu_integer", threads=threads).run_flat, x))
             for build, lib in libs.items()}
    outs = [call()[0] for call in calls.values()]
    if any(not torch.equal(outs[0], o) for o in outs):
        raise AssertionError("the kernel builds disagree on the integer DeiT-S output")
    times = {"quiet": {k: t.median for k, t in interleaved(calls, runs).items()}}
    if under_load:
        with _busy():
            times["under_load"] = {k: t.median for k, t in interleaved(calls, runs).items()}
    for when, med in times.items():
        print(f"DeiT-S b{batch}{f' + token_merge r={merge_r}' if merge_r else ''} {threads} thread(s) {isa} {when}: " + ", ".join(
            f"{k} {v * 1e3:.1f} ms" for k, v in med.items()))
    return times


@contextlib.contextmanager
def _busy():
    """A second process on the cores (numpy float matmuls) while the block runs."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(2)
        yield
    finally:
        busy.kill()
        busy.wait()


def _library_from(source: Path):
    """The kernel library built from another source file, with the bindings of ``library()``."""
    saved = kernels.SOURCE
    kernels.SOURCE = source
    try:
        return kernels.library.__wrapped__()
    finally:
        kernels.SOURCE = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--isa", nargs="+", default=["vnni"], choices=kernels.ISA_LEVELS)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--under-load", action="store_true")
    p.add_argument("--baseline", type=Path, help="another kernel source to time side by side")
    p.add_argument("--end-to-end", action="store_true", help="the integer-only DeiT-S instead of single GEMMs")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--token-merge", type=int, default=0, metavar="R", help="--end-to-end: token_merge r=R first")
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    libs = {"this": kernels.library()}
    if args.baseline:
        libs["baseline"] = _library_from(args.baseline.resolve())
    isas = [i for i in args.isa if i in kernels.available_isas()]
    if args.end_to_end:
        times = end_to_end(libs, args.batch, args.threads[-1], isas[0], args.runs, args.under_load, args.token_merge)
        (RESULTS / "vnni_peak_end_to_end.json").write_text(json.dumps(times, indent=1))
        return 0
    peaks = {t: peak_gmacs(t) for t in args.threads}
    for t, g in peaks.items():
        print(f"VPDPBUSD peak, {t} thread(s): {g:.1f} GMAC/s = {2 * g:.1f} GOPS")
    quiet = measure(libs, isas, args.threads, args.runs)
    loaded = {}
    if args.under_load:
        with _busy():
            loaded = measure(libs, isas, args.threads, args.runs)
    print(f"{'build':8} {'isa':5} {'thr':>3} {'M':>5} {'gemm':5} {'K':>5} {'N':>5} {'best ms':>8} {'median':>8} "
          f"{'GMAC/s':>7} {'of peak':>7}" + (f" {'loaded':>8} {'slowdown':>8}" if loaded else ""))
    out = {"peak_gmacs": peaks, "load_average": os.getloadavg(), "gemm": []}
    for (build, isa, t, batch, name), (best, median) in quiet.items():
        k, n = SHAPES[name]
        m = 197 * batch
        gmacs = m * k * n / best / 1e9
        line = (f"{build:8} {isa:5} {t:3} {m:5} {name:5} {k:5} {n:5} {best * 1e3:8.3f} {median * 1e3:8.3f} "
                f"{gmacs:7.1f} {gmacs / peaks[t]:7.1%}")
        row = {"build": build, "isa": isa, "threads": t, "M": m, "gemm": name, "K": k, "N": n, "best_seconds": best,
               "median_seconds": median, "gmacs_best": gmacs, "fraction_of_peak": gmacs / peaks[t]}
        if loaded:
            loaded_median = loaded[(build, isa, t, batch, name)][1]
            line += f" {loaded_median * 1e3:8.3f} {loaded_median / median:7.2f}x"
            row["median_seconds_under_load"] = loaded_median
        print(line)
        out["gemm"].append(row)
    (RESULTS / "vnni_peak.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
