"""The row kernels and float edges of cpu_integer on inputs big enough to be cut into several chunks on the
helper-thread pool (go_pool.h; test_cpu_integer.py's small cases run on the caller alone): still bit-identical
to the reference ops, whichever thread ran which rows."""
import torch

from graphopt.ir import Graph, TensorType
from tests.test_cpu_integer import I32, _check, _gen, _rand, isa  # noqa: F401  (isa: the fixture)


def test_layernorm_requant_and_add_over_many_chunks(isa):
    g = _gen(21)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(I32, (8, 64, 48)))    # 512 rows: >= 3 chunks of >= 8192 / 48 rows
    m, c = graph.add_constant(_rand((48,), I32, g, 1, 1023)), graph.add_constant(_rand((48,), I32, g, -999, 999))
    y = graph.call("int.layernorm", x, C=48, sh=5, F=13, iters=20)
    graph.set_outputs([graph.call("int.requant", y, m, c, pre=0, k=20, lo=-128, hi=127, zero_point=128, dtype="u8"),
                       graph.call("int.requant", x, m, c, pre=3, k=16, lo=-128, hi=127, zero_point=0, dtype="i8"),
                       graph.call("int.add", x, y, m, m, c, pa=2, pb=0, k=9, lo=-32768, hi=32767, zero_point=0,
                                  dtype="i32")])
    _check(graph, [_rand((8, 64, 48), I32, g, -32768, 32767)],
           {"cpu.int_layernorm": 1, "cpu.int_requant": 2, "cpu.int_add": 1})   # y has two users: no fusion


def test_masked_shiftmax_over_many_chunks(isa):
    g = _gen(22)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(I32, (4, 3, 64, 33)))  # 768 rows: >= 3 chunks of >= 8192 / 33 rows
    mask = graph.add_input("mask", TensorType(torch.bool, (4, 1, 1, 33)))
    graph.set_outputs([graph.call("int.shiftmax", x, mask, X=96, n=12, bits=8)])
    _check(graph, [_rand((4, 3, 64, 33), I32, g, -3000, 3000), torch.rand(4, 1, 1, 33, generator=g) > 0.3],
           {"cpu.int_shiftmax": 1})


def test_quantize_and_dequantize_over_many_chunks():
    g = _gen(23)
    graph = Graph("before")
    x = graph.add_input("x", TensorType(torch.float32, (3, 200, 128)))   # 76800 values: 2 chunks of 2^16
    q = graph.call("int.quantize", x, inv_scale=1 / 0.037, zero_point=128, lo=-128, hi=127, dtype="u8")
    scale = graph.add_constant(torch.rand(128, generator=g) * 0.1)
    offset = graph.add_constant(torch.randn(1, 128, generator=g))
    graph.set_outputs([q, graph.call("int.dequantize", q, scale, offset, zero_point=128)])
    _check(graph, [torch.randn(3, 200, 128, generator=g) * 3], {"cpu.int_quantize": 1, "cpu.int_dequantize": 1})


def test_gemm_with_more_threads_than_cores_claims_every_chunk_once(isa):
    """Five threads on this machine's cores: the caller claims row blocks from the front, four helpers from the
    back at once; every row equals the int64 product, whoever computed it, on repeated calls."""
    from graphopt.backends import cpu_integer_library as kernels
    g = _gen(23)
    a, w = _rand((500, 64), torch.uint8, g), _rand((40, 64), torch.int8, g)
    packed, colsum = kernels.pack_b(w)
    want = a.long() @ w.long().T
    for _ in range(20):
        out = torch.full((500, 40), -1, dtype=I32)
        kernels.gemm(a, packed, 40, kernels.epilogue("raw", I32, (-128 * colsum).to(I32)), out, 5)
        assert torch.equal(out.long(), want - 128 * w.long().sum(1))


def test_the_kernel_libraries_share_one_pool(isa):
    """The GEMM kernels, the token merge and the float edges are three libraries on one pool of helpers (c_build
    shares the first one loaded): interleaved calls from each on five threads stay exact."""
    from graphopt.backends import cpu_integer_edges, cpu_integer_tokens
    from graphopt.backends import cpu_integer_library as kernels
    libraries = [kernels.library(), cpu_integer_tokens.library(), cpu_integer_edges.library()]
    assert len({lib.go_pool_state() for lib in libraries}) == 1
    g = _gen(24)
    a, w = _rand((300, 64), torch.uint8, g), _rand((40, 64), torch.int8, g)
    packed, colsum = kernels.pack_b(w)
    x = torch.randn(4, 50_000, generator=g)
    for _ in range(5):
        out = torch.empty(300, 40, dtype=I32)
        kernels.gemm(a, packed, 40, kernels.epilogue("raw", I32, (-128 * colsum).to(I32)), out, 5)
        assert torch.equal(out.long(), a.long() @ w.long().T - 128 * w.long().sum(1))
        q = cpu_integer_edges.quantize(x, 1 / 0.05, -128, 127, 0, torch.int8, 5)
        assert torch.equal(q, torch.clamp(torch.floor(x * (1 / 0.05) + 0.5), -128, 127).to(torch.int8))
