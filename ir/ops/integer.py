"""Integer-only ops (I-ViT style): every reference implementation uses integer tensor arithmetic
only (no float inside), and every backend computes exactly the same integers.

Representations
  * ``u8``  GEMM activations: stored value = v + zero_point (zero_point 128 for signed 8-bit data,
    0 for attention probabilities). ONNX Runtime's fast ``MatMulInteger`` path is u8 x s8.
  * ``i8``  weights and the right-hand operand of activation x activation matmuls.
  * ``i32`` accumulators, the residual stream (16-bit values by default) and every other integer.

Rounding (the same in every backend)
  * ``tdiv(a, b)``   division truncating toward zero (C/ONNX integer ``Div``).
  * ``fdiv(a, 2^k)`` floor division (arithmetic right shift).
  * requantization ``y = clamp(fdiv(tdiv(x, 2^pre) * m + c, 2^k), lo, hi) + zp``: ``m``/``2^k`` is the
    dyadic rescale computed at compile time and ``c`` carries bias/offset terms plus the
    ``2^(k-1)`` of round-half-up. The pass guarantees ``|tdiv(x,2^pre)*m + c| + (-lo)*2^k < 2^31``
    so int32 arithmetic never overflows.
"""
from __future__ import annotations

import sympy
import torch

from graphopt.ir.cost import _n, register_cost, register_elementwise_cost
from graphopt.ir.opdef import Attr, OpError, register_op
from graphopt.ir.ops.nn import _conv2d_type, _linear_type, _matmul_type
from graphopt.ir.ops.rules import broadcast_shapes
from graphopt.ir.types import TensorType, normalize_axis

I32, I64 = torch.int32, torch.int64
INT_DTYPES = {"u8": torch.uint8, "i8": torch.int8, "i32": torch.int32}


def tdiv(a: torch.Tensor, b) -> torch.Tensor:
    """Integer division truncating toward zero (ONNX/C semantics)."""
    return torch.div(a, b, rounding_mode="trunc")


def fdiv_pow2(a: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bitwise_right_shift(a, k) if k else a


def _signed(x: torch.Tensor, zp: int) -> torch.Tensor:
    """The signed values of a stored 8-bit tensor, as int32."""
    return x.to(I32) - zp if zp else x.to(I32)


def _as_i8(x: torch.Tensor, zp: int) -> torch.Tensor | None:
    """int8 view of stored values when they fit int8 (for torch._int_mm)."""
    if x.dtype == torch.int8 and zp == 0:
        return x
    if x.dtype == torch.uint8 and zp == 128:
        return (x.to(torch.int16) - 128).to(torch.int8)
    return None


def int_matmul_2d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 product of two 2-D int8 tensors (int32 accumulation)."""
    if a.device.type == "cpu" and a.shape[0] and a.shape[1] and b.shape[1]:
        try:
            return torch._int_mm(a.contiguous(), b.contiguous())
        except RuntimeError:      # builds without the int8 kernel for this shape
            pass
    return torch.matmul(a.to(torch.int64), b.to(torch.int64)).to(I32)


def _int_gemm(a: torch.Tensor, a_zp: int, b: torch.Tensor, b_zp: int) -> torch.Tensor:
    """Batched integer matmul of stored 8-bit tensors with zero points, int32 result."""
    a8, b8 = _as_i8(a, a_zp), _as_i8(b, b_zp)
    if a8 is None or b8 is None or a.dim() < 2 or b.dim() < 2:
        return torch.matmul(_signed(a, a_zp), _signed(b, b_zp))
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a8 = a8.expand(batch + a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b8 = b8.expand(batch + b.shape[-2:]).reshape(-1, *b.shape[-2:])
    out = torch.stack([int_matmul_2d(x, y) for x, y in zip(a8, b8)])
    return out.reshape(batch + (a.shape[-2], b.shape[-1]))


def _check_int(op: str, t: TensorType, allowed=("u8", "i8", "i32")):
    if t.dtype not in [INT_DTYPES[a] for a in allowed]:
        raise OpError(f"{op}: expects an integer tensor ({'/'.join(allowed)}), got {t}")


# ---- edges ------------------------------------------------------------------------------------
def _quantize_type(x, *, inv_scale, zero_point, lo, hi, dtype):
    if not x.dtype.is_floating_point:
        raise OpError(f"int.quantize: input must be float, got {x}")
    if dtype not in INT_DTYPES:
        raise OpError(f"int.quantize: dtype must be one of {list(INT_DTYPES)}")
    return x.with_dtype(INT_DTYPES[dtype])


@register_op("int.quantize", inputs=["x"],
             attrs={"inv_scale": Attr("float"), "zero_point": Attr("int", 0), "lo": Attr("int"), "hi": Attr("int"),
                    "dtype": Attr("str", "i32")}, infer=_quantize_type, tags=["quant", "elementwise"])
def quantize(x, *, inv_scale, zero_point, lo, hi, dtype):
    """Graph edge only: q = clamp(floor(x * inv_scale + 0.5), lo, hi) + zero_point (float32 math)."""
    y = torch.floor(x.float() * torch.tensor(inv_scale, dtype=torch.float32) + 0.5)
    y = torch.clamp(y, lo, hi).to(I32) + zero_point
    return y.to(INT_DTYPES[dtype])


def _dequantize_type(x, scale, offset=None, *, zero_point):
    if x.dtype.is_floating_point:
        raise OpError(f"int.dequantize: input must be integer, got {x}")
    broadcast_shapes(x.shape, scale.shape)
    return x.with_dtype(torch.float32)


@register_op("int.dequantize", inputs=["x", "scale", "offset?"], attrs={"zero_point": Attr("int", 0)},
             infer=_dequantize_type, tags=["quant", "elementwise"])
def dequantize(x, scale, offset=None, *, zero_point):
    """Graph edge only: (x - zero_point) * scale (+ offset), float32."""
    y = (x.to(I32) - zero_point).float() * scale
    return y + offset if offset is not None else y


# ---- GEMMs ------------------------------------------------------------------------------------
def _ilinear_type(x, weight, bias=None, *, x_zp):
    _check_int("int.linear", x, ("u8", "i8"))
    if weight.dtype != torch.int8 or (bias is not None and bias.dtype != I32):
        raise OpError(f"int.linear: weight must be i8 and bias i32, got {weight}, {bias}")
    return _linear_type(x, weight, bias).with_dtype(I32)


@register_op("int.linear", inputs=["x", "weight", "bias?"], attrs={"x_zp": Attr("int", 0)},
             infer=_ilinear_type, tags=["gemm", "integer"])
def int_linear(x, weight, bias=None, *, x_zp):
    """int32 y = (x - x_zp) @ weight^T + bias (int8 x int8, int32 accumulation)."""
    lead = x.shape[:-1]
    a = x.reshape(-1, x.shape[-1])
    a8 = _as_i8(a, x_zp)
    y = int_matmul_2d(a8, weight.t()) if a8 is not None else torch.matmul(_signed(a, x_zp), weight.to(I32).t())
    if bias is not None:
        y = y + bias
    return y.reshape(lead + (weight.shape[0],))


def _imatmul_type(a, b, *, a_zp, b_zp):
    _check_int("int.matmul", a, ("u8", "i8"))
    _check_int("int.matmul", b, ("u8", "i8"))
    return _matmul_type(a, b).with_dtype(I32)


@register_op("int.matmul", inputs=["a", "b"], attrs={"a_zp": Attr("int", 0), "b_zp": Attr("int", 0)},
             infer=_imatmul_type, tags=["gemm", "integer"])
def int_matmul(a, b, *, a_zp, b_zp):
    """int32 (a - a_zp) @ (b - b_zp)."""
    return _int_gemm(a, a_zp, b, b_zp)


def _iconv_type(x, weight, bias=None, *, stride, x_zp):
    _check_int("int.conv2d", x, ("u8", "i8"))
    if weight.dtype != torch.int8:
        raise OpError(f"int.conv2d: weight must be i8, got {weight}")
    return _conv2d_type(x, weight, bias, stride=stride, padding=(0, 0), dilation=(1, 1), groups=1).with_dtype(I32)


@register_op("int.conv2d", inputs=["x", "weight", "bias?"], attrs={"stride": Attr("ints", (1, 1)), "x_zp": Attr("int", 0)},
             infer=_iconv_type, tags=["gemm", "integer"])
def int_conv2d(x, weight, bias=None, *, stride, x_zp):
    """int32 conv2d without padding/dilation/groups: im2col + int8 GEMM."""
    o, c, kh, kw = weight.shape
    cols = x.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])          # B, C, OH, OW, KH, KW
    b, _, oh, ow = cols.shape[:4]
    cols = cols.permute(0, 2, 3, 1, 4, 5).reshape(b * oh * ow, c * kh * kw)
    a8 = _as_i8(cols, x_zp)
    w = weight.reshape(o, c * kh * kw)
    y = int_matmul_2d(a8, w.t()) if a8 is not None else torch.matmul(_signed(cols, x_zp), w.to(I32).t())
    if bias is not None:
        y = y + bias
    return y.reshape(b, oh, ow, o).permute(0, 3, 1, 2).contiguous()


# ---- requantization --------------------------------------------------------------------------
def _requant_type(x, m, c, *, pre, k, lo, hi, zero_point, dtype):
    _check_int("int.requant", x)
    if m.dtype != I32 or c.dtype != I32:
        raise OpError(f"int.requant: m and c must be i32, got {m}, {c}")
    broadcast_shapes(x.shape, m.shape, c.shape)
    if dtype not in INT_DTYPES:
        raise OpError(f"int.requant: dtype must be one of {list(INT_DTYPES)}")
    return x.with_dtype(INT_DTYPES[dtype])


_REQ_ATTRS = {"pre": Attr("int", 0, "truncating pre-shift"), "k": Attr("int"), "lo": Attr("int"), "hi": Attr("int"),
              "zero_point": Attr("int", 0), "dtype": Attr("str", "i32")}


def requant_math(t: torch.Tensor, c: torch.Tensor, *, k, lo, hi, zero_point, dtype):
    y = torch.clamp(fdiv_pow2(t + c.to(I64), k), lo, hi) + zero_point
    return y.to(INT_DTYPES[dtype])


@register_op("int.requant", inputs=["x", "m", "c"], attrs=_REQ_ATTRS, infer=_requant_type, tags=["integer"])
def requant(x, m, c, *, pre, k, lo, hi, zero_point, dtype):
    """y = clamp(floor((tdiv(x, 2^pre) * m + c) / 2^k), lo, hi) + zero_point (m, c per channel or scalar)."""
    t = tdiv(x.to(I64), 2 ** pre) if pre else x.to(I64)
    return requant_math(t * m.to(I64), c, k=k, lo=lo, hi=hi, zero_point=zero_point, dtype=dtype)


def _add_type(a, b, ma, mb, c, *, pa, pb, k, lo, hi, zero_point, dtype):
    _check_int("int.add", a, ("i32",))
    _check_int("int.add", b, ("i32",))
    return a.with_shape(broadcast_shapes(a.shape, b.shape, ma.shape, mb.shape, c.shape)).with_dtype(INT_DTYPES[dtype])


@register_op("int.add", inputs=["a", "b", "ma", "mb", "c"],
             attrs={"pa": Attr("int", 0), "pb": Attr("int", 0), "k": Attr("int"), "lo": Attr("int"), "hi": Attr("int"),
                    "zero_point": Attr("int", 0), "dtype": Attr("str", "i32")},
             infer=_add_type, tags=["integer"])
def int_add(a, b, ma, mb, c, *, pa, pb, k, lo, hi, zero_point, dtype):
    """Residual add, each branch with its own multiplier to the common output scale:
    y = clamp(floor((tdiv(a,2^pa)*ma + tdiv(b,2^pb)*mb + c) / 2^k), lo, hi) + zero_point."""
    ta = (tdiv(a.to(I64), 2 ** pa) if pa else a.to(I64)) * ma.to(I64)
    tb = (tdiv(b.to(I64), 2 ** pb) if pb else b.to(I64)) * mb.to(I64)
    return requant_math(ta + tb, c, k=k, lo=lo, hi=hi, zero_point=zero_point, dtype=dtype)


# ---- nonlinearities ----------------------------------------------------------------------------
def shift_pow2(u: torch.Tensor, X: int, n: int) -> torch.Tensor:
    """u >= 0 in units of 1/X of a power of two: 2X * 2^n * 2^(-u/X), by shifts. u is clamped to n*X;
    q = u // X is the integer part, r = u - X*q the fraction, 2^(-r/X) ~ 1 - r/(2X) (I-ViT's linear
    2^r approximation), so the result is (2X - r) << (n - q)."""
    u = torch.clamp(u, min=0, max=n * X)
    q = tdiv(u, X)
    r = u - X * q
    return (2 * X - r) * torch.bitwise_left_shift(torch.ones_like(q), n - q)


def _shiftmax_type(x, mask=None, *, dim, X, n, bits):
    _check_int("int.shiftmax", x, ("i32",))
    if dim != -1 and normalize_axis(dim, x.rank) != x.rank - 1:
        raise OpError("int.shiftmax: only the last axis")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise OpError(f"int.shiftmax: mask must be bool, got {mask}")
        broadcast_shapes(x.shape, mask.shape)
    return x.with_dtype(torch.uint8)


@register_op("int.shiftmax", inputs=["x", "mask?"],
             attrs={"dim": Attr("int", -1), "X": Attr("int", doc="input units per power of two (log2(e) folded into the scale)"),
                    "n": Attr("int", 14), "bits": Attr("int", 8)},
             infer=_shiftmax_type, tags=["integer"])
def shiftmax(x, mask=None, *, dim, X, n, bits):
    """Integer softmax (Shiftmax) over the last axis. The input scale is 1 / (X log2 e), so
    e = shift_pow2(rowmax - x) ~ 2X 2^n exp(logit - max); masked positions (mask False) get e = 0.
    Output u8 (zero point 0, scale 2^-bits) = min(tdiv(e 2^bits + tdiv(sum, 2), sum), 2^bits - 1).
    The pass keeps X 2^(n+1+bits) <= 2^30 and T 2X 2^n < 2^31."""
    x = x.to(I32)
    if mask is not None:
        x = torch.where(mask, x, torch.tensor(-2 ** 30, dtype=I32))
    e = shift_pow2(torch.amax(x, dim=-1, keepdim=True) - x, X, n)
    if mask is not None:
        e = torch.where(mask, e, torch.zeros((), dtype=I32))
    s = torch.clamp(torch.sum(e, dim=-1, keepdim=True, dtype=I32), min=1)
    y = tdiv(e * 2 ** bits + tdiv(s, 2), s)
    return torch.clamp(y, max=2 ** bits - 1).to(torch.uint8)


def _gelu_type(x, *, X, n, bits, in_bits):
    _check_int("int.shiftgelu", x, ("i32",))
    return x


@register_op("int.shiftgelu", inputs=["x"],
             attrs={"X": Attr("int", doc="input units per power of two of 1.702 x (scale 1/(1.702 log2(e) X))"),
                    "n": Attr("int", 10), "bits": Attr("int", 12), "in_bits": Attr("int", 16)},
             infer=_gelu_type, tags=["integer"])
def shiftgelu(x, *, X, n, bits, in_bits):
    """ShiftGELU: GELU(x) ~ x sigmoid(1.702 x). The input (clamped to in_bits) has scale
    1/(1.702 log2(e) X), so e = shift_pow2(|x|) ~ one * exp(-1.702 |x|) with one = 2X 2^n;
    sigmoid = one / (one + e) for x >= 0 and e / (one + e) below, rounded to 2^-bits.
    Output int32 x * sig (scale: input scale * 2^-bits). Needs X 2^(n+1+bits) <= 2^30."""
    x = torch.clamp(x.to(I32), -2 ** (in_bits - 1), 2 ** (in_bits - 1) - 1)
    one = 2 * X * 2 ** n
    e = shift_pow2(torch.abs(x), X, n)
    den = e + one
    num = torch.where(x >= 0, torch.full_like(e, one), e)
    sig = tdiv(num * 2 ** bits + tdiv(den, 2), den)
    return x * sig


def isqrt_newton(v: torch.Tensor, iters: int) -> torch.Tensor:
    k = torch.full_like(v, 2 ** 16)
    for _ in range(iters):
        k = tdiv(k + tdiv(v, k), 2)
    return k


def _ln_type(x, *, C, sh, F, iters):
    _check_int("int.layernorm", x, ("i32",))
    return x


@register_op("int.layernorm", inputs=["x"],
             attrs={"C": Attr("int"), "sh": Attr("int", 0), "F": Attr("int", 14), "iters": Attr("int", 20)},
             infer=_ln_type, tags=["integer"])
def layernorm(x, *, C, sh, F, iters):
    """Integer LayerNorm over the last axis (without gamma/beta, which go into the next requant):
    y = x - tdiv(sum x, C); ys = y / 2^sh rounded half away from zero (only for the variance);
    std = isqrt(max(sum ys^2, 1)) by Newton from 2^16; out = tdiv(y * 2^F, std * 2^sh), i.e.
    normalized * 2^F / sqrt(C), |out| <= 1.5 * 2^F."""
    x = x.to(I32)
    mean = tdiv(torch.sum(x, dim=-1, keepdim=True, dtype=I32), C)
    y = x - mean
    ys = tdiv(y + torch.sign(y) * (2 ** (sh - 1)), 2 ** sh) if sh else y
    var = torch.clamp(torch.sum(ys * ys, dim=-1, keepdim=True, dtype=I32), min=1)
    std = isqrt_newton(var, iters)
    return tdiv(y * (2 ** F), std * (2 ** sh) if sh else std)


INTEGER_OPS = ("int.quantize", "int.dequantize", "int.linear", "int.matmul", "int.conv2d", "int.requant", "int.add",
               "int.shiftmax", "int.shiftgelu", "int.layernorm")


@register_cost("int.linear")
def _linear_cost(node):
    x, w = node.inputs[0].type, node.inputs[1].type
    rows = _n(x) / sympy.sympify(x.shape[-1])
    return 2 * rows * sympy.sympify(w.shape[1]) * sympy.sympify(w.shape[0])


@register_cost("int.matmul")
def _matmul_cost(node):
    return 2 * _n(node.output.type) * sympy.sympify(node.inputs[0].type.shape[-1])


@register_cost("int.conv2d")
def _conv2d_cost(node):
    w = node.inputs[1].type
    return 2 * _n(node.output.type) * sympy.sympify(w.shape[1]) * w.shape[2] * w.shape[3]


register_elementwise_cost(3, "int.quantize", "int.dequantize")
register_elementwise_cost(5, "int.requant")
register_elementwise_cost(7, "int.add")
register_elementwise_cost(20, "int.shiftmax", "int.shiftgelu")
register_elementwise_cost(8, "int.layernorm")
