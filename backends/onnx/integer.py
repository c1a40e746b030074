"""ONNX lowerings of the integer-only ops (``graphopt.ir.ops.integer``), bit-identical to their
reference implementations, using standard ai.onnx ops only:

    int.linear / int.matmul -> MatMulInteger (u8 activations with zero point 128 x s8: ORT's fast path)
    int.conv2d              -> ConvInteger
    int.requant / int.add   -> Mul, Add, Div, Clip, Cast on int32
    int.shiftmax/shiftgelu/layernorm -> ReduceMax/ReduceSum, Div, GatherElements (tables), Where, ...

Rounding: ONNX integer ``Div`` truncates toward zero, which is the reference's ``tdiv``. The floor
shift of a requantization is a ``Div`` by 2^k after adding ``(-lo) * 2^k``: for non-negative numbers
truncation is the floor, and every negative sum is clipped to ``lo`` either way. ``BitShift`` is not
used (it is unsigned only, and slower in ONNX Runtime than an int32 ``Div`` by a scalar).

Table lookups (powers of two in Shiftmax, ShiftGELU) are ``GatherElements`` on the flattened index:
ONNX Runtime's ``Gather`` copies one element per index through a generic block copy and is about ten
times slower per element.
"""
from __future__ import annotations

import torch

from graphopt.backends import LoweringError
from graphopt.backends.onnx.emitter import register_lowering
from graphopt.ir.onnx_common import onnx_dtype
from graphopt.ir.ops.integer import INT_DTYPES

I32 = torch.int32
INT32_MAX = 2 ** 31 - 1


def _i32(em, name: str, dtype: torch.dtype) -> str:
    return name if dtype == I32 else em.one("Cast", [name], to=onnx_dtype(I32))


def _lit(em, value: int, dtype=I32) -> str:
    return em.literal(int(value), dtype)


def _tdiv(em, x: str, d: int) -> str:
    return x if d == 1 else em.one("Div", [x, _lit(em, d)])


def _const_i32(em, tensor: torch.Tensor) -> str:
    t = tensor.to(torch.int64)
    if t.abs().max().item() > INT32_MAX:
        raise LoweringError("an int32 constant of a requantization overflows")
    return em.literal(t.to(I32).tolist(), I32, shape=list(t.shape))


def _finish(em, node, acc: str, c: torch.Tensor, *, k, lo, hi, zero_point, dtype) -> str:
    """clamp(floor((acc + c) / 2^k), lo, hi) + zero_point, cast to dtype (acc already int32).

    a = acc + c + (-lo) 2^k; clamp(floor(a / 2^k), 0, hi - lo) == tdiv(clip(a, 0, (hi-lo+1) 2^k - 1), 2^k): on a
    non-negative int32 the truncating Div is the floor, and ONNX Runtime's int32 Div by a scalar is cheaper than
    the Cast/BitShift/Cast round trip through uint32 (BitShift is unsigned only)."""
    K = -lo
    shifted = c.to(torch.int64) + K * 2 ** k
    y = em.one("Add", [acc, _const_i32(em, shifted)])
    target = INT_DTYPES[dtype]
    top = (hi - lo + 1) * 2 ** k - 1
    if top <= INT32_MAX:
        y = _tdiv(em, em.one("Clip", [y, _lit(em, 0), _lit(em, top)]), 2 ** k)
    else:
        y = em.one("Clip", [_tdiv(em, y, 2 ** k), _lit(em, 0), _lit(em, hi - lo)])
    if lo + zero_point:
        y = em.one("Add", [y, _lit(em, lo + zero_point)])
    if target == I32:
        return em.one("Identity", [y], em.out(node))
    return em.one("Cast", [y], em.out(node), to=onnx_dtype(target))


def _scaled(em, node, i: int, pre: int, m_index: int) -> str:
    x = _i32(em, em.input(node, i), node.inputs[i].type.dtype)
    x = _tdiv(em, x, 2 ** pre)
    m = node.inputs[m_index]
    if m.const is not None and m.const.numel() == 1 and int(m.const.reshape(()).item()) == 1:
        return x
    return em.one("Mul", [x, em.input(node, m_index)])


def _gelu_fusable(node) -> bool:
    """An int.requant of an int.shiftgelu output with per-tensor constants: lowered as one table."""
    src = node.inputs[0].producer
    return (node.op == "int.requant" and src is not None and src.op == "int.shiftgelu" and src.attrs["in_bits"] <= 16
            and node.inputs[1].is_constant and node.inputs[1].const.numel() == 1
            and node.inputs[2].is_constant and node.inputs[2].const.numel() == 1)


def _constant_offset(index: int):
    def supports(node) -> str | None:
        return None if node.inputs[index].is_constant else "the offset c must be a constant"
    return supports


@register_lowering("int.requant", supports=_constant_offset(2))
def _requant(em, node):
    a = node.attrs
    src = node.inputs[0].producer
    if _gelu_fusable(node):
        # requant(shiftgelu(x)) is a function of the 16-bit x: one table, one lookup (the shiftgelu
        # node's own output is then unused and ONNX Runtime drops it)
        from graphopt.ir.ops.integer import requant, shiftgelu
        g = src.attrs
        table = requant(shiftgelu(_gelu_domain(src), X=g["X"], n=g["n"], bits=g["bits"], in_bits=g["in_bits"]),
                        node.inputs[1].const, node.inputs[2].const, **a)
        return _lookup(em, em.literal(table.tolist(), table.dtype), _gelu_index(em, src), em.out(node))
    t = _scaled(em, node, 0, a["pre"], 1)
    return _finish(em, node, t, node.inputs[2].const, k=a["k"], lo=a["lo"], hi=a["hi"],
                   zero_point=a["zero_point"], dtype=a["dtype"])


@register_lowering("int.add", supports=_constant_offset(4))
def _add(em, node):
    a = node.attrs
    ta = _scaled(em, node, 0, a["pa"], 2)
    tb = _scaled(em, node, 1, a["pb"], 3)
    s = em.one("Add", [ta, tb])
    return _finish(em, node, s, node.inputs[4].const, k=a["k"], lo=a["lo"], hi=a["hi"],
                   zero_point=a["zero_point"], dtype=a["dtype"])


def _zp(em, value, zp: int):
    if not zp:
        return ""
    dtype = value.type.dtype
    return em.literal(zp, dtype)


def _constant_weight(node) -> str | None:
    return None if node.inputs[1].is_constant else "the weight must be a constant"


@register_lowering("int.linear", supports=_constant_weight)
def _linear(em, node):
    x, w = node.inputs[0], node.inputs[1]
    wt = em.constant(w, transform="T")
    zp = _zp(em, x, node.attrs["x_zp"])
    inputs = [em.input(node, 0), wt] + ([zp] if zp else [])
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    if not has_bias:
        return em.one("MatMulInteger", inputs, em.out(node))
    y = em.one("MatMulInteger", inputs)
    return em.one("Add", [y, em.input(node, 2)], em.out(node))


@register_lowering("int.matmul")
def _matmul(em, node):
    a, b = node.inputs
    za, zb = _zp(em, a, node.attrs["a_zp"]), _zp(em, b, node.attrs["b_zp"])
    inputs = [em.input(node, 0), em.input(node, 1)]
    if za or zb:
        inputs += [za, zb] if zb else [za]
    return em.one("MatMulInteger", inputs, em.out(node))


@register_lowering("int.conv2d")
def _conv(em, node):
    x, w = node.inputs[0], node.inputs[1]
    zp = _zp(em, x, node.attrs["x_zp"])
    o, c, kh, kw = w.type.shape
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    xs = x.type.shape
    if tuple(node.attrs["stride"]) == (kh, kw) and w.is_constant and isinstance(xs[2], int) and isinstance(xs[3], int) \
            and xs[2] % kh == 0 and xs[3] % kw == 0:
        # non-overlapping patches (ViT patch embedding): patchify + MatMulInteger, ORT's fast u8 x s8 GEMM
        # (its ConvInteger is far slower)
        h, wd = xs[2] // kh, xs[3] // kw
        p = em.one("Reshape", [em.input(node, 0), em.literal([-1, c, h, kh, wd, kw])])
        p = em.one("Transpose", [p], perm=[0, 2, 4, 1, 3, 5])
        p = em.one("Reshape", [p, em.literal([-1, h, wd, c * kh * kw])])
        wt = w.const.reshape(o, c * kh * kw).t().contiguous()
        y = em.one("MatMulInteger", [p, em.literal(wt.tolist(), torch.int8, shape=list(wt.shape))] + ([zp] if zp else []))
        if has_bias:
            y = em.one("Add", [y, em.input(node, 2)])
        return em.one("Transpose", [y], em.out(node), perm=[0, 3, 1, 2])
    inputs = [em.input(node, 0), em.input(node, 1)] + ([zp] if zp else [])
    y = em.one("ConvInteger", inputs, None if has_bias else em.out(node), strides=list(node.attrs["stride"]),
               kernel_shape=[kh, kw])
    if not has_bias:
        return y
    bias = node.inputs[2].const.reshape(-1, 1, 1)
    return em.one("Add", [y, em.literal(bias.tolist(), I32, shape=list(bias.shape))], em.out(node))


@register_lowering("int.quantize")
def _quantize(em, node):
    a = node.attrs
    x = em.input(node, 0, torch.float32)
    y = em.one("Mul", [x, em.literal(a["inv_scale"], torch.float32)])
    y = em.one("Floor", [em.one("Add", [y, em.literal(0.5, torch.float32)])])
    y = em.one("Clip", [y, em.literal(float(a["lo"]), torch.float32), em.literal(float(a["hi"]), torch.float32)])
    if a["zero_point"]:
        y = em.one("Add", [y, em.literal(float(a["zero_point"]), torch.float32)])
    return em.one("Cast", [y], em.out(node), to=onnx_dtype(INT_DTYPES[a["dtype"]]))


@register_lowering("int.dequantize")
def _dequantize(em, node):
    x = _i32(em, em.input(node, 0), node.inputs[0].type.dtype)
    if node.attrs["zero_point"]:
        x = em.one("Sub", [x, _lit(em, node.attrs["zero_point"])])
    y = em.one("Mul", [em.one("Cast", [x], to=onnx_dtype(torch.float32)), em.input(node, 1, torch.float32)])
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        return em.one("Add", [y, em.input(node, 2, torch.float32)], em.out(node))
    return em.one("Identity", [y], em.out(node))


def _reduce(em, op: str, x: str) -> str:
    if em.opset >= 18 or op == "ReduceSum":
        return em.one(op, [x, em.literal([-1])], keepdims=1)
    return em.one(op, [x], axes=[-1], keepdims=1)


def _lookup(em, table: str, index: str, output: str | None = None) -> str:
    """table[index] elementwise for a 1-D table: GatherElements on the flattened index (indices may be
    negative, counting from the table's end)."""
    flat = em.one("GatherElements", [table, em.one("Reshape", [index, em.literal([-1])])], axis=0)
    return em.one("Reshape", [flat, em.one("Shape", [index])], output)


def _pow2_table(em, X: int, n: int) -> str:
    """shift_pow2 over its whole (clamped) domain 0..n*X: one lookup replaces the shift arithmetic."""
    from graphopt.ir.ops.integer import shift_pow2
    return em.literal(shift_pow2(torch.arange(n * X + 1, dtype=I32), X, n).tolist(), I32)


@register_lowering("int.shiftmax")
def _shiftmax(em, node):
    a = node.attrs
    X, n, bits = a["X"], a["n"], a["bits"]
    x = _i32(em, em.input(node, 0), node.inputs[0].type.dtype)
    mask = em.input(node, 1) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if mask:
        x = em.one("Where", [mask, x, _lit(em, -2 ** 30)])
    u = em.one("Clip", [em.one("Sub", [_reduce(em, "ReduceMax", x), x]), _lit(em, 0), _lit(em, n * X)])
    e = _lookup(em, _pow2_table(em, X, n), u)
    if mask:
        e = em.one("Where", [mask, e, _lit(em, 0)])
    s = em.one("Max", [_reduce(em, "ReduceSum", e), _lit(em, 1)])
    num = em.one("Add", [em.one("Mul", [e, _lit(em, 2 ** bits)]), _tdiv(em, s, 2)])
    y = em.one("Clip", [em.one("Div", [num, s]), _lit(em, 0), _lit(em, 2 ** bits - 1)])   # Clip: cheaper than Min
    return em.one("Cast", [y], em.out(node), to=onnx_dtype(torch.uint8))


def _gelu_index(em, node) -> str:
    """The shiftgelu input clamped to its in_bits range: an index into the table of ``_gelu_domain``
    (negative values index from its end). The clamp is skipped when the producer's own clamp is tighter."""
    b = node.attrs["in_bits"]
    x = _i32(em, em.input(node, 0), node.inputs[0].type.dtype)
    src = node.inputs[0].producer
    if src is not None and src.op in ("int.requant", "int.add") and src.attrs["dtype"] == "i32" \
            and src.attrs["lo"] + src.attrs["zero_point"] >= -2 ** (b - 1) \
            and src.attrs["hi"] + src.attrs["zero_point"] <= 2 ** (b - 1) - 1:
        return x
    return em.one("Clip", [x, _lit(em, -2 ** (b - 1)), _lit(em, 2 ** (b - 1) - 1)])


def _gelu_domain(node) -> torch.Tensor:
    """0 .. 2^(b-1)-1 then -2^(b-1) .. -1: the table position of every in_bits value v is v mod 2^b."""
    b = node.attrs["in_bits"]
    return torch.cat([torch.arange(0, 2 ** (b - 1), dtype=I32), torch.arange(-2 ** (b - 1), 0, dtype=I32)])


def _table_sized(node) -> str | None:
    return None if node.attrs["in_bits"] <= 16 else f"in_bits {node.attrs['in_bits']} > 16 (a table of 2^in_bits values)"


@register_lowering("int.shiftgelu", supports=_table_sized)
def _shiftgelu(em, node):
    """ShiftGELU of a 16-bit input is a table of 2^16 int32 values: one lookup (bit-identical)."""
    from graphopt.ir.ops.integer import shiftgelu
    a = node.attrs
    out = node.outputs[0]
    if out.uses and all(_gelu_fusable(u) for u, _ in out.uses) and not any(out is o for o in node.graph.outputs):
        # every reader lowers requant(shiftgelu(x)) as its own table of x: nothing to compute here
        # (the name is never read in the ONNX graph)
        return em.input(node, 0)
    table = shiftgelu(_gelu_domain(node), X=a["X"], n=a["n"], bits=a["bits"], in_bits=a["in_bits"])
    return _lookup(em, em.literal(table.tolist(), I32), _gelu_index(em, node), em.out(node))


@register_lowering("int.layernorm")
def _layernorm(em, node):
    a = node.attrs
    x = _i32(em, em.input(node, 0), node.inputs[0].type.dtype)
    mean = _tdiv(em, _reduce(em, "ReduceSum", x), a["C"])
    y = em.one("Sub", [x, mean])
    sh = a["sh"]
    # only ys^2 is used, and |round-half-away(y / 2^sh)| = tdiv(|y| + 2^(sh-1), 2^sh): no Sign/Mul pass
    ys = _tdiv(em, em.one("Add", [em.one("Abs", [y]), _lit(em, 2 ** (sh - 1))]), 2 ** sh) if sh else y
    var = em.one("Max", [_reduce(em, "ReduceSum", em.one("Mul", [ys, ys])), _lit(em, 1)])
    k = _lit(em, 2 ** 16)
    for _ in range(a["iters"]):
        k = _tdiv(em, em.one("Add", [k, em.one("Div", [var, k])]), 2)
    if sh:
        k = em.one("Mul", [k, _lit(em, 2 ** sh)])
    return em.one("Div", [em.one("Mul", [y, _lit(em, 2 ** a["F"])]), k], em.out(node))
