"""What the ``torch`` backend runs for ``sparse_linear``: the C SpMM kernel (``cpu_sparse_library``) on
CPU float32 tensors, the Triton kernel on CUDA tensors, the densifying reference elsewhere; and the
micro-benchmark (``time_spmm``) that ``sparsify`` decides its substitutions with.

The C kernel, not ``torch.sparse.mm``, by measurement (``bench/sparse.py``, 2-core AMD EPYC, 2 threads,
1576 x 384 -> 1536, at 50/70/80/90/95% sparsity): torch CSR 34/24/15/12/3.9 ms, this kernel
12/6.7/4.4/2.6/1.6 ms, dense ``F.linear`` 12/11/11/11/11 ms. torch's CSR matmul only beats dense at 95%.
"""
from __future__ import annotations

import os
import platform

import torch

from graphopt.backends import cpu_sparse_library, triton_sparse
from graphopt.backends.kernels import register_kernel
from graphopt.ir.ops.sparse import OP, register_spmm_timer, sparse_linear as reference, to_block1x4, to_csr
from graphopt.timing import interleaved


def _on_cpu_float(node) -> str | None:
    if node.inputs[0].type.dtype != torch.float32 or node.inputs[3].type.dtype != torch.float32:
        return f"the C SpMM kernel takes float32 (got {node.inputs[0].type.dtype} x {node.inputs[3].type.dtype})"
    return None


@register_kernel("torch", OP, supports=_on_cpu_float, name="cpu_spmm")
def sparse_linear_cpu(x, row_ptr, col, values, bias=None, *, format, out_features, in_features):
    """The C kernel on CPU tensors (Triton on CUDA tensors when it imports), else the reference."""
    if x.is_cuda and triton_sparse.available():
        return triton_sparse.sparse_linear(x, row_ptr, col, values, bias, format=format, out_features=out_features,
                                           in_features=in_features)
    if x.device.type == "cpu" and cpu_sparse_library.available():
        return cpu_sparse_library.spmm_f32(x.to(torch.float32), row_ptr, col, values.reshape(-1), out_features,
                                           bias, block=format == "block1x4").to(x.dtype)
    return reference(x, row_ptr, col, values, bias, format=format, out_features=out_features,
                     in_features=in_features)


@register_spmm_timer("torch")
def time_spmm(weight: torch.Tensor, fmt: str, rows: int, threads: int, repeats: int = 5) -> tuple[float, float]:
    """Dense ``F.linear`` against this backend's SpMM for one pruned weight at ``rows`` input rows: median
    ms of ``repeats`` interleaved rounds (graphopt.timing); the micro-benchmark ``sparsify`` decides with."""
    n, k = weight.shape
    x = torch.randn(rows, k)
    w = weight.to(torch.float32).contiguous()
    packed = (to_csr if fmt == "csr" else to_block1x4)(w)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = interleaved({"dense": lambda: torch.nn.functional.linear(x, w),
                         "sparse": lambda: sparse_linear_cpu(x, *packed, format=fmt, out_features=n, in_features=k)},
                        runs=repeats, warmup=1)
    finally:
        torch.set_num_threads(before)
    return 1e3 * t["dense"].median, 1e3 * t["sparse"].median


time_spmm.machine = f"{platform.machine()} {platform.processor()} {os.cpu_count()} cpus " + \
    ("C SpMM" if cpu_sparse_library.available() else "reference")
