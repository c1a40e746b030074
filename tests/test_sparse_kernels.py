"""The sparse_linear op and its kernels against the dense reference: the C fp32 CSR / 1x4 SpMM, the int8
1x4-block SpMM (VNNI and portable) with the int.requant epilogue against int.linear + int.requant,
the Triton kernel under TRITON_INTERPRET=1; across sparsities, empty rows and ragged shapes."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch
import torch.nn.functional as F

from graphopt.backends import cpu_sparse_library as lib
from graphopt.ir import Graph, TensorType
from graphopt.ir.ops.integer import int_linear, requant
from graphopt.ir.ops.sparse import densify, sparse_linear, to_block1x4, to_csr

# (rows, out, in, sparsity): ragged sizes (not multiples of the 64-row tile, 16-column buffer or 4-wide
# blocks), fully dense, fully empty, a single row
SHAPES = [(70, 33, 17, 0.5), (7, 5, 13, 0.9), (130, 40, 64, 0.0), (65, 24, 20, 1.0), (1, 48, 36, 0.7),
          (200, 96, 96, 0.95)]


def _pruned(n, k, sparsity, block, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    else:
        w = torch.randn(n, k, generator=g)
    width = 4 if block else 1
    drop = (torch.rand(n, (k + width - 1) // width, generator=g) < sparsity).repeat_interleave(width, 1)[:, :k]
    drop[0] = True  # an empty row
    return w.masked_fill(drop, 0)


@pytest.mark.parametrize("fmt", ["csr", "block1x4"])
def test_formats_round_trip_and_reference(fmt):
    w = _pruned(9, 10, 0.6, fmt == "block1x4")
    packed = (to_csr if fmt == "csr" else to_block1x4)(w)
    assert torch.equal(densify(fmt, *packed, 9, 10), w)
    assert int(packed[0][1] - packed[0][0]) == 0          # row 0 is empty
    x, b = torch.randn(3, 10), torch.randn(9)
    assert torch.allclose(sparse_linear(x, *packed, b, format=fmt, out_features=9, in_features=10),
                          F.linear(x, w, b), atol=1e-6)


@pytest.mark.parametrize("fmt", ["csr", "block1x4"])
@pytest.mark.parametrize("rows,n,k,sparsity", SHAPES)
def test_c_spmm_f32_matches_dense(fmt, rows, n, k, sparsity):
    w = _pruned(n, k, sparsity, fmt == "block1x4")
    row_ptr, col, val = (to_csr if fmt == "csr" else to_block1x4)(w)
    x, b = torch.randn(rows, k), torch.randn(n)
    for threads in (1, 2):
        y = lib.spmm_f32(x, row_ptr, col, val.reshape(-1), n, b, block=fmt == "block1x4", threads=threads)
        torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    y = lib.spmm_f32(x.t().contiguous().t()[:, :k], row_ptr, col, val.reshape(-1), n, None, block=fmt == "block1x4")
    torch.testing.assert_close(y, F.linear(x, w), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("isa", ["vnni", "portable"])
@pytest.mark.parametrize("rows,n,k,sparsity", SHAPES)
def test_c_spmm_s8_matches_int_linear_and_requant(isa, rows, n, k, sparsity):
    if isa == "vnni" and not lib.has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI")
    lib.limit_isa(isa)
    try:
        g = torch.Generator().manual_seed(1)
        w = _pruned(n, k, sparsity, True, torch.int8)
        row_ptr, col, val = to_block1x4(w)
        packed = val.contiguous().view(torch.int32).reshape(-1)
        x = torch.randint(0, 256, (rows, k), generator=g, dtype=torch.uint8)
        bias = torch.randint(-5000, 5000, (n,), generator=g, dtype=torch.int32)
        expected = int_linear(x, w, bias, x_zp=128)
        folded = bias - 128 * w.to(torch.int32).sum(1)            # the zero point folded into the bias
        assert torch.equal(lib.spmm_s8(x, row_ptr, col, packed, n, folded.to(torch.int32), threads=2), expected)
        m = torch.randint(1, 300, (n,), generator=g, dtype=torch.int32)
        c = torch.randint(-9000, 9000, (n,), generator=g, dtype=torch.int32)
        for out, (lo, hi, zp, name) in ((torch.uint8, (-128, 127, 128, "u8")), (torch.int8, (-128, 127, 0, "i8")),
                                        (torch.int32, (-32768, 32767, 0, "i32"))):
            want = requant(expected, m, c, pre=2, k=10, lo=lo, hi=hi, zero_point=zp, dtype=name)
            got = lib.spmm_s8(x, row_ptr, col, packed, n, folded.to(torch.int32), out_dtype=out, threads=2,
                              requant=dict(m=m, c=c, pre=2, k=10, lo=lo, hi=hi, zp=zp))
            assert got.dtype == out and torch.equal(got, want)
    finally:
        lib.limit_isa("vnni")


@pytest.mark.parametrize("fmt", ["csr", "block1x4"])
def test_triton_kernel_matches_dense(fmt, triton_interpreter):
    from graphopt.backends import triton_sparse

    for rows, n, k, sparsity in [(37, 9, 13, 0.5), (5, 6, 8, 1.0)]:
        w = _pruned(n, k, sparsity, fmt == "block1x4")
        packed = (to_csr if fmt == "csr" else to_block1x4)(w)
        x, b = torch.randn(rows, k), torch.randn(n)
        y = triton_sparse.sparse_linear(x, *packed, b, format=fmt, out_features=n, in_features=k, block_m=16,
                                        block_j=8)
        torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_torch_backend_runs_the_c_kernel_for_sparse_linear():
    from graphopt.backends.kernels import select
    from graphopt.backends.torch_backend import TorchExecutable

    w = _pruned(12, 20, 0.8, False)
    g = Graph("sparse")
    x = g.add_input("x", TensorType(torch.float32, ("batch", 5, 20)))
    packed = [g.add_constant(t) for t in to_csr(w)]
    b = torch.randn(12)
    y = g.op.sparse_linear(x, *packed, g.add_constant(b), format="csr", out_features=12, in_features=20)
    g.set_outputs([y])
    node = g.find_nodes("sparse_linear")[0]
    kernel, _ = select("torch", node)
    assert kernel is not None and kernel.name == "cpu_spmm"
    inp = torch.randn(3, 5, 20)
    torch.testing.assert_close(TorchExecutable(g).run_flat(inp)[0], F.linear(inp, w, b), atol=1e-5, rtol=1e-5)


def test_sparse_linear_cost_counts_stored_weights():
    from graphopt.ir.cost import graph_cost

    w = _pruned(8, 16, 0.75, False)
    g = Graph("sparse")
    x = g.add_input("x", TensorType(torch.float32, (10, 16)))
    packed = [g.add_constant(t) for t in to_csr(w)]
    g.set_outputs([g.op.sparse_linear(x, *packed, format="csr", out_features=8, in_features=16)])
    assert int(graph_cost(g).total.flops) == 2 * 10 * int((w != 0).sum())


def _fake_int8_timer(monkeypatch, tmp_path, times: dict):
    """cpu_integer's int8 SpMM decision reads ``times`` {(rows, k, n): (dense ms, sparse ms)} instead of
    timing the kernels, with its cache in ``tmp_path``; returns the list of timer calls."""
    from graphopt.backends import cpu_integer_sparse

    calls = []

    def timer(weight, fmt, rows, threads):
        n, k = weight.shape
        calls.append((rows, k, n))
        return times[(rows, k, n)]

    monkeypatch.setattr(cpu_integer_sparse, "time_int8", timer)
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path))
    return calls


@pytest.mark.parametrize("x_dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("sparsity,kernel", [(0.97, "cpu.int_spmm"), (0.3, "cpu.int_gemm")])
def test_cpu_integer_runs_block_sparse_int8_gemms_on_the_spmm_kernel(x_dtype, sparsity, kernel, monkeypatch, tmp_path):
    """int.linear -> int.requant with a mostly-zero 1x4-block weight measured faster sparse becomes cpu.int_spmm
    (bit-identical to the reference ops); a weight with few zero blocks stays on the dense GEMM unmeasured."""
    from graphopt.backends.cpu_integer import lower_to_kernels
    from graphopt.backends.torch_backend import run

    calls = _fake_int8_timer(monkeypatch, tmp_path, {(33, 1030, 40): (2.0, 1.0)})
    g = torch.Generator().manual_seed(3)
    k, n = 1030, 40
    graph = Graph("int")
    x = graph.add_input("x", TensorType(x_dtype, (3, 11, k)))
    w = graph.add_constant(_pruned(n, k, sparsity, True, torch.int8, seed=3))
    b = graph.add_constant(torch.randint(-5000, 5000, (n,), generator=g, dtype=torch.int32))
    y = graph.call("int.linear", x, w, b, x_zp=128 if x_dtype == torch.uint8 else 0)
    m = graph.add_constant(torch.randint(1, 511, (n,), generator=g, dtype=torch.int32))
    c = graph.add_constant(torch.randint(-99, 99, (n,), generator=g, dtype=torch.int32))
    graph.set_outputs([graph.call("int.requant", y, m, c, pre=0, k=12, lo=-128, hi=127, zero_point=128, dtype="u8"),
                       graph.call("int.linear", x, w, b, x_zp=128 if x_dtype == torch.uint8 else 0)])
    lowered, report = lower_to_kernels(graph, threads=2)
    assert len(calls) == (1 if kernel == "cpu.int_spmm" else 0)   # one shape, measured once
    assert lowered.op_counts().get(kernel) == 2 and not [op for op in lowered.op_counts() if op.startswith("int.")]
    info = torch.iinfo(x_dtype)
    inp = torch.randint(info.min, info.max + 1, (3, 11, k), generator=g, dtype=x_dtype)
    for want, got in zip(run(graph, inp), run(lowered, inp)):
        assert want.dtype == got.dtype and torch.equal(want, got)


def test_cpu_integer_int8_sparse_decision_follows_the_measured_times(monkeypatch, tmp_path):
    """Two 90%-block-sparse int8 layers: the one measured faster sparse becomes cpu.int_spmm (its decision line
    on the node), the one measured slower stays dense with both times in the report; the times are cached per
    shape, so a second lowering measures nothing."""
    from graphopt.backends.cpu_integer import lower_to_kernels

    calls = _fake_int8_timer(monkeypatch, tmp_path, {(10, 64, 48): (3.0, 1.0), (10, 48, 24): (1.0, 1.5)})
    graph = Graph("int")
    x = graph.add_input("x", TensorType(torch.uint8, (10, 64)))
    h = graph.call("int.linear", x, graph.add_constant(_pruned(48, 64, 0.9, True, torch.int8, seed=1)), x_zp=128)
    h = graph.call("int.requant", h, graph.add_constant(torch.tensor(300, dtype=torch.int32)),
                   graph.add_constant(torch.tensor(0, dtype=torch.int32)), pre=0, k=16, lo=0, hi=255, zero_point=0,
                   dtype="u8")
    y = graph.call("int.linear", h, graph.add_constant(_pruned(24, 48, 0.9, True, torch.int8, seed=2)), x_zp=0)
    graph.set_outputs([y])
    for run_ in range(2):
        lowered, report = lower_to_kernels(graph, threads=2)
        assert lowered.op_counts().get("cpu.int_spmm") == 1 and lowered.op_counts().get("cpu.int_gemm") == 1
        spmm = lowered.find_nodes("cpu.int_spmm")[0]
        assert spmm.attrs["n"] == 48 and "SPARSE (dense 3 ms, int8 block1x4 1 ms" in spmm.meta["sparse_decision"]
        dense = next(e.nodes for e in report if e.kernel == "cpu.int_gemm")
        assert "-> 24] " in dense
        assert "sparse: dense (dense 1 ms, int8 block1x4 1.5 ms; sparse would be 1.50x the dense time" in dense
    assert sorted(calls) == [(10, 48, 24), (10, 64, 48)]
