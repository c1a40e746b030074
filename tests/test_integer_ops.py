"""The integer-only ops: hand-worked examples, agreement with their float counterparts within the
stated quantization error, and bit-identical ONNX Runtime lowerings."""
import math

import pytest
import torch
import torch.nn.functional as F

from graphopt.ir import Graph, TensorType
from graphopt.ir.ops import integer as I

I32 = torch.int32


def t(values, dtype=I32):
    return torch.tensor(values, dtype=dtype)


# ---- hand-worked examples ----------------------------------------------------------------------
def test_requant_hand_worked():
    # floor((x * 3 + 2) / 4), clamp to int8, then + 128 (u8 storage)
    x = t([100, -100, 7, -7, 1000, -1000])
    y = I.requant(x, t(3), t(2), pre=0, k=2, lo=-128, hi=127, zero_point=128, dtype="u8")
    assert y.dtype == torch.uint8
    assert y.tolist() == [75 + 128, -75 + 128, 5 + 128, -5 + 128, 255, 0]
    # a truncating pre-shift by 2^3 first: tdiv(-100, 8) = -12 (not -13)
    y = I.requant(t([-100, 100]), t(1), t(0), pre=3, k=0, lo=-1000, hi=1000, zero_point=0, dtype="i32")
    assert y.tolist() == [-12, 12]


def test_int_add_hand_worked():
    # floor((a * 2 + b * 3 + 4) / 8): (20 + 12 + 4) / 8 = 4.5 -> 4; (-20 - 12 + 4) / 8 = -3.5 -> -4
    args = (t([10, -10]), t([4, -4]), t(2), t(3), t(4))
    assert I.int_add(*args, pa=0, pb=0, k=3, lo=-5, hi=5, zero_point=0, dtype="i32").tolist() == [4, -4]
    assert I.int_add(*args, pa=0, pb=0, k=3, lo=-3, hi=3, zero_point=0, dtype="i32").tolist() == [3, -3]
    # pre-shifts: tdiv(10, 4) = 2, tdiv(-10, 4) = -2 -> (4 + 12 + 4) / 8 = 2.5 -> 2; (-4 - 12 + 4) / 8 -> -2
    assert I.int_add(*args, pa=2, pb=0, k=3, lo=-5, hi=5, zero_point=0, dtype="i32").tolist() == [2, -2]


def test_int_linear_and_matmul_hand_worked():
    x = t([[129, 127]], torch.uint8)           # values [1, -1] with zero point 128
    w = t([[2, 3], [4, 5]], torch.int8)
    b = t([10, 20])
    assert I.int_linear(x, w, b, x_zp=128).tolist() == [[1 * 2 - 3 + 10, 4 - 5 + 20]]
    a = t([[[130, 126]]], torch.uint8)         # [2, -2]
    bm = t([[[1], [3]]], torch.int8)
    assert I.int_matmul(a, bm, a_zp=128, b_zp=0).tolist() == [[[2 - 6]]]


def test_int_linear_large_matches_int64():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (37, 64), generator=g, dtype=torch.uint8)
    w = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
    b = torch.randint(-1000, 1000, (48,), generator=g, dtype=I32)
    ref = (x.long() - 128) @ w.long().t() + b.long()
    assert torch.equal(I.int_linear(x, w, b, x_zp=128).long(), ref)


def test_int_conv2d_matches_int64():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8)
    w = torch.randint(-127, 128, (5, 3, 4, 4), generator=g, dtype=torch.int8)
    b = torch.randint(-100, 100, (5,), generator=g, dtype=I32)
    ref = F.conv2d((x.double() - 128), w.double(), b.double(), stride=4)   # exact: small integers in float64
    assert torch.equal(I.int_conv2d(x, w, b, stride=(4, 4), x_zp=128).double(), ref)


def test_quantize_dequantize_hand_worked():
    x = torch.tensor([0.0, 0.24, 0.25, -0.25, -0.26, 100.0])
    q = I.quantize(x, inv_scale=2.0, zero_point=128, lo=-128, hi=127, dtype="u8")   # floor(2x + 0.5)
    assert q.tolist() == [128, 128, 129, 128, 127, 255]
    d = I.dequantize(q, torch.tensor(0.5), torch.tensor(1.0), zero_point=128)
    assert d.tolist() == [1.0, 1.0, 1.5, 1.0, 0.5, 64.5]


def test_shift_pow2_hand_worked():
    # X = 4 units per power of two, n = 4: one = 2X * 2^n = 128. u = 4 is exactly one halving -> 64;
    # u = 6: q = 1, r = 2 -> (8 - 2) << 3 = 48 (exact 2^-1.5 * 128 = 45.3); u = 100 clamps to n*X -> 8
    assert I.shift_pow2(t([0, 4, 6, 100]), 4, 4).tolist() == [128, 64, 48, 8]


def test_shiftmax_hand_worked():
    # input scale 1/(X log2 e): [4, 0] is a logit gap of ln 2 -> softmax [2/3, 1/3] = [170.7, 85.3] / 256.
    # e = [128, 64], sum 192: tdiv(128*256 + 96, 192) = 171, tdiv(64*256 + 96, 192) = 85
    assert I.shiftmax(t([[4, 0]]), dim=-1, X=4, n=4, bits=8).tolist() == [[171, 85]]
    masked = I.shiftmax(t([[4, 0]]), t([[True, False]], torch.bool), dim=-1, X=4, n=4, bits=8)
    assert masked.tolist() == [[255, 0]]


def test_shiftgelu_hand_worked():
    # X = 4, n = 4, bits = 4, one = 128. x = 4 means 1.702 x_real = ln 2: e = 64, sig = tdiv(128*16 + 96, 192)
    # = 11 (exact 2/3 * 16 = 10.7) -> 44; x = -4: sig = tdiv(64*16 + 96, 192) = 5 -> -20; x = 0 -> 0
    assert I.shiftgelu(t([4, -4, 0]), X=4, n=4, bits=4, in_bits=16).tolist() == [44, -20, 0]


def test_layernorm_hand_worked():
    # mean 40, y = [-30, -10, 10, 30], sum y^2 = 2000, isqrt = 44, z = tdiv(y * 256, 44)
    z = I.layernorm(t([[10, 30, 50, 70]]), C=4, sh=0, F=8, iters=20)
    assert z.tolist() == [[-174, -58, 58, 174]]


def test_isqrt_newton_is_floor_sqrt_within_one():
    v = torch.cat([torch.arange(1, 5000), torch.randint(1, 2 ** 31 - 1, (20000,), generator=torch.Generator().manual_seed(0))]).to(I32)
    k = I.isqrt_newton(v, 20).long()
    exact = torch.tensor([math.isqrt(int(a)) for a in v.tolist()])
    assert ((k - exact) >= 0).all() and ((k - exact) <= 1).all()


# ---- against the float ops ----------------------------------------------------------------------
def test_shiftmax_vs_softmax():
    g = torch.Generator().manual_seed(0)
    X = 128
    logits = torch.randn(64, 197, generator=g) * 3
    x = torch.round(logits * X / math.log(2)).to(I32)
    p = I.shiftmax(x, dim=-1, X=X, n=14, bits=8).double() / 256
    ref = torch.softmax(logits.double(), -1)
    assert (p - ref).abs().max() <= 0.02          # stated error: 2% absolute per probability
    assert ((p.sum(-1) - 1).abs() <= 0.1).all()


def test_shiftgelu_vs_gelu():
    X = 128
    s = math.log(2) / (1.702 * X)
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    y = I.shiftgelu(torch.round(x / s).to(I32), X=X, n=10, bits=12, in_bits=16).double() * s / 2 ** 12
    assert (y - F.gelu(x)).abs().max() <= 0.03     # x*sigmoid(1.702x) itself is within 0.021 of GELU


def test_layernorm_vs_float():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 384, generator=g) * 2000 + torch.randn(16, 1, generator=g) * 500
    xi = torch.round(x).to(I32)
    C, sh, F_ = 384, 5, 14
    z = I.layernorm(xi, C=C, sh=sh, F=F_, iters=20).double() * math.sqrt(C) / 2 ** F_
    ref = F.layer_norm(xi.double(), (C,))
    assert (z - ref).abs().max() <= 0.01


def test_requant_vs_float_rescale():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2 ** 20, 2 ** 20, (10000,), generator=g, dtype=I32)
    r = 3.7e-5
    k = 24
    m = round(r * 2 ** k)
    y = I.requant(x, t(m), t(2 ** (k - 1)), pre=0, k=k, lo=-128, hi=127, zero_point=0, dtype="i32")
    ref = torch.clamp(torch.round(x.double() * r), -128, 127)
    assert (y.double() - ref).abs().max() <= 1


# ---- ONNX Runtime lowerings are bit-identical --------------------------------------------------
def _one_op_graph(op, inputs, consts=(), **attrs):
    g = Graph("one")
    vals = [g.add_input(f"x{i}", TensorType.of(v)) for i, v in enumerate(inputs)]
    vals += [g.add_constant(c, f"c{i}") for i, c in enumerate(consts)]
    g.set_outputs([g.op(op, *vals, **attrs)])
    return g


def _ort_equal(graph, inputs):
    pytest.importorskip("onnxruntime")
    from graphopt.backends.registry import lower
    from graphopt.backends.torch_backend import run

    ref = run(graph, *inputs)[0]
    got = lower(graph, "onnxruntime", threads=1).run_flat(*inputs)[0]
    assert got.dtype == ref.dtype and torch.equal(got, ref), (got, ref)


G = torch.Generator().manual_seed(3)


def test_ort_requant_bit_identical():
    x = torch.randint(-2 ** 22, 2 ** 22, (4, 33, 16), generator=G, dtype=I32)
    m = torch.randint(1, 300, (16,), generator=G, dtype=I32)
    c = torch.randint(-2 ** 12, 2 ** 12, (16,), generator=G, dtype=I32)
    for dtype, lo, hi, zp in (("u8", -128, 127, 128), ("i8", -128, 127, 0), ("i32", -2 ** 15, 2 ** 15 - 1, 0)):
        _ort_equal(_one_op_graph("int.requant", [x], [m, c], pre=3, k=14, lo=lo, hi=hi, zero_point=zp, dtype=dtype), [x])


def test_ort_add_and_gemms_bit_identical():
    a = torch.randint(-2 ** 15, 2 ** 15, (2, 9, 8), generator=G, dtype=I32)
    b = torch.randint(-2 ** 20, 2 ** 20, (2, 9, 8), generator=G, dtype=I32)
    consts = [torch.randint(1, 2 ** 12, (8,), generator=G, dtype=I32), t(77), t(-12345)]
    _ort_equal(_one_op_graph("int.add", [a, b], consts, pa=0, pb=5, k=13, lo=-2 ** 15, hi=2 ** 15 - 1), [a, b])
    x = torch.randint(0, 256, (2, 9, 32), generator=G, dtype=torch.uint8)
    w = torch.randint(-127, 128, (24, 32), generator=G, dtype=torch.int8)
    _ort_equal(_one_op_graph("int.linear", [x], [w, torch.randint(-999, 999, (24,), generator=G, dtype=I32)], x_zp=128), [x])
    q = torch.randint(0, 256, (2, 3, 9, 16), generator=G, dtype=torch.uint8)
    k = torch.randint(-128, 128, (2, 3, 16, 9), generator=G, dtype=torch.int8)
    _ort_equal(_one_op_graph("int.matmul", [q, k], a_zp=128), [q, k])
    _ort_equal(_one_op_graph("int.matmul", [q, k], a_zp=0), [q, k])
    img = torch.randint(0, 256, (2, 3, 8, 8), generator=G, dtype=torch.uint8)
    cw = torch.randint(-127, 128, (6, 3, 4, 4), generator=G, dtype=torch.int8)
    _ort_equal(_one_op_graph("int.conv2d", [img], [cw, torch.arange(6, dtype=I32)], stride=(4, 4), x_zp=128), [img])
    _ort_equal(_one_op_graph("int.conv2d", [img], [cw, torch.arange(6, dtype=I32)], stride=(2, 2), x_zp=128), [img])


def test_ort_nonlinear_ops_bit_identical():
    s = torch.randint(-2 ** 15, 2 ** 15, (2, 3, 17, 17), generator=G, dtype=I32)
    mask = torch.rand(2, 1, 17, 17, generator=G) > 0.3
    _ort_equal(_one_op_graph("int.shiftmax", [s], X=128, n=14, bits=8), [s])
    _ort_equal(_one_op_graph("int.shiftmax", [s, mask], X=128, n=14, bits=8), [s, mask])
    x = torch.randint(-2 ** 17, 2 ** 17, (3, 5, 40), generator=G, dtype=I32)     # also outside in_bits
    _ort_equal(_one_op_graph("int.shiftgelu", [x], X=128, n=10, bits=12, in_bits=16), [x])
    g = Graph("gelu_requant")                                                      # the fused table
    xv = g.add_input("x", TensorType.of(x))
    y = g.op("int.shiftgelu", xv, X=128, n=10, bits=12, in_bits=16)
    g.set_outputs([g.op("int.requant", y, g.add_constant(t(1234)), g.add_constant(t(2 ** 20)), pre=5, k=21,
                        lo=-128, hi=127, zero_point=128, dtype="u8")])
    _ort_equal(g, [x])
    x = torch.randint(-2 ** 15, 2 ** 15, (3, 5, 40), generator=G, dtype=I32)     # within the op's int16 range
    _ort_equal(_one_op_graph("int.layernorm", [x], C=40, sh=3, F=14, iters=20), [x])
    f = torch.randn(3, 5, 40, generator=G) * 10
    _ort_equal(_one_op_graph("int.quantize", [f], inv_scale=12.7, zero_point=128, lo=-128, hi=127, dtype="u8"), [f])
    _ort_equal(_one_op_graph("int.dequantize", [x], [torch.rand(40, generator=G), torch.randn(40, generator=G)]), [x])


def test_int_add_vs_float_with_pass_parameters():
    """The pass's dyadic choice for a residual add (two branches, different scales) stays within one
    output unit of the exact float rescale, and never overflows int32 on worst-case inputs."""
    from graphopt.passes.integer_only.dyadic import choose_dyadic
    ra, rb = torch.tensor(0.8137, dtype=torch.float64), torch.tensor([3.1e-3, 7.7e-4, 1.9e-3], dtype=torch.float64)
    ba, bb = 2 ** 15, 2 ** 24
    (pa, pb), k, (ma, mb) = choose_dyadic([(ra, ba), (rb, bb)], 0.0, 2 ** 15, 2 ** 15)
    c = t(2 ** (k - 1))
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-ba, ba, (1000, 3), generator=g, dtype=I32)
    b = torch.randint(-bb, bb, (1000, 3), generator=g, dtype=I32)
    y = I.int_add(a, b, ma.to(I32), mb.to(I32), c, pa=pa, pb=pb, k=k, lo=-2 ** 15, hi=2 ** 15 - 1, zero_point=0, dtype="i32")
    ref = torch.clamp(torch.round(a.double() * ra + b.double() * rb), -2 ** 15, 2 ** 15 - 1)
    # stated error: rounding (1) + multiplier rounding (|x| |r - m / 2^(p+k)|) + pre-shift truncation (r 2^p)
    bound = 1.0
    for r, m, p, xb in ((ra, ma, pa, ba), (rb, mb, pb, bb)):
        bound += (xb * (r - m.double() / 2 ** (p + k)).abs()).max().item() + (r * 2 ** p).max().item()
    assert bound <= 5                                  # 5 units of a 16-bit residual: 1.5e-4 of full scale
    assert (y.double() - ref).abs().max() <= bound
    worst = (ba // 2 ** pa + 1) * ma.abs().max() + (bb // 2 ** pb + 1) * mb.abs().max() + c + 2 ** 15 * 2 ** k
    assert worst < 2 ** 31
