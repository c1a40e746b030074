"""The C kernels build on every x86-64 CPU, not only on this one: each source compiled for the x86-64 baseline
and for AVX2 without AVX-512 (``-march=native`` replaced). A function whose intrinsics need an instruction set
its ``target`` attribute does not name builds here, where -march=native enables it, and fails on such a CPU
(``requant_row_avx512`` read 8-bit rows with an AVX512-VL load under target("avx512f,avx512bw"))."""
import subprocess
from pathlib import Path

import pytest

from graphopt.backends.c_build import FLAGS, KernelBuildError, compiler

SOURCES = sorted(Path(__file__).resolve().parents[1].joinpath("backends").glob("*.c"))


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_each_kernel_source_compiles_for_other_cpus(source, march, tmp_path):
    try:
        cc = compiler()
    except KernelBuildError as e:
        pytest.skip(str(e))
    flags = [f"-march={march}" if f == "-march=native" else f for f in FLAGS if f != "-shared"]
    done = subprocess.run([cc, *flags, "-O0", "-c", str(source), "-o", str(tmp_path / "out.o")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
