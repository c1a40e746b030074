"""The ops of the ``cpu_integer`` backend: fused integer kernels (``cpu_integer_kernels.c``) that the
lowering (``cpu_integer.py``) puts in place of chains of ``int.*`` ops. Each computes exactly the
integers of the chain it replaces:

    cpu.int_gemm       int.linear [-> int.requant [-> int.shiftgelu -> int.requant] | -> int.add]
    cpu.int_bmm        int.matmul [-> int.requant [-> (add int.lookup ->) int.shiftmax]]
                       int.matmul -> int.add(., int.lookup) -> int.requant -> int.shiftmax (kind add_requant)
                       int.matmul -> int.requant, heads merged, -> int.requant (kind requant_requant, out_perm:
                       cpu_integer_layout.py)
    cpu.int_layernorm  int.layernorm [-> int.requant]
    cpu.int_shiftmax   [add int.lookup ->] int.shiftmax
    cpu.int_requant    int.requant (m, c constant along the last axis)
    cpu.int_add        int.add (ma, mb, c constant along the last axis)
    cpu.int_token_merge  int.token_merge (``cpu_integer_tokens.c``)
    cpu.int_quantize / cpu.int_dequantize  int.quantize / int.dequantize (``cpu_integer_edges.c``)

Epilogue kinds: ``raw`` (int32 accumulator + bias), ``requant`` (per-column m, c), ``table`` (requant,
then ``table[y - lo]``: a per-tensor requant(shiftgelu(.)) folded into a table over the requant's
range), ``table_requant`` (requant, the shiftgelu table, then a per-column requant m2, c2) and ``add``
(the residual ``int.add`` with the accumulator as one branch and ``res`` as the other). Shiftmax takes the
proportional attention of token merging (``sizes``, ``table``: logits + table[clamp(sizes)]) inside its row loop;
a bmm of kind ``add_requant`` instead adds that term to its int32 accumulator by the ``int.add`` (m, mb, c; pre, pb)
and requantizes by m2, c2 before Shiftmax. ``requant_requant`` (bmm only): requant, then the per-column m2, c2 requant
of the value with its zero point, m2 and c2 holding N columns for each item of the second batch axis (a head).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from graphopt.backends import cpu_integer_edges as edges
from graphopt.backends import cpu_integer_library as kernels
from graphopt.backends import cpu_integer_tokens as tokens
from graphopt.ir.cost import _n, register_cost, register_elementwise_cost
from graphopt.ir.opdef import Attr, OpError, register_op
from graphopt.ir.ops.integer import INT_DTYPES
from graphopt.ir.ops.integer_tokens import _int_token_merge_type
from graphopt.ir.ops.tokens import _token_merge_cost, effective_r
from graphopt.ir.types import TensorType, dims_equal

_EPILOGUE = {"kind": Attr("str", "raw"), "out": Attr("str", "i32"), "pre": Attr("int", 0), "k": Attr("int", 0),
             "lo": Attr("int", 0), "hi": Attr("int", 0), "zp": Attr("int", 0), "threads": Attr("int", 1)}


_SECOND = {"pre2": Attr("int", 0), "k2": Attr("int", 0), "lo2": Attr("int", 0), "hi2": Attr("int", 0),
           "zp2": Attr("int", 0)}
_GELU = {"gelu_x": Attr("int", 0), "gelu_n": Attr("int", 0), "gelu_bits": Attr("int", 0), "gelu_in_bits": Attr("int", 0)}


# Epilogue records by the addresses of their constants and their attributes: building one is ~10 us of ctypes
# per kernel call, a tenth of a DeiT-S forward's Python time at batch 1. An entry holds its tensors, so an
# address in a key is not reused while the entry lives; the cache is emptied when it reaches _CACHED entries.
_RECORDS: dict = {}
_CACHED = 1024


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _epilogue(kind, out, bias, m, c, table, res=None, mb=None, second=None, *, pre, k, lo, hi, zp, pb=0, ks=None,
              gelu=(0, 0, 0, 0)):
    """The C epilogue record, the cached one for these constants (a copy pointing at ``res`` when given)."""
    s = second or {}
    key = (kind, out, pre, k, lo, hi, zp, pb, gelu, _address(bias), _address(m), _address(c), _address(table),
           _address(mb), _address(ks), _address(s.get("m")), _address(s.get("c")), s.get("pre"), s.get("k"),
           s.get("lo"), s.get("hi"), s.get("zp"))
    record = _RECORDS.get(key)
    if record is None:
        if len(_RECORDS) >= _CACHED:
            _RECORDS.clear()
        record = _RECORDS[key] = kernels.epilogue(kind, INT_DTYPES[out], bias, pre=pre, k=k, lo=lo, hi=hi, zp=zp, m=m,
                                                  c=c, table=table, pb=pb, mb=mb, second=second, ks=ks, gelu=gelu)
    return record if res is None else kernels.with_residual(record, res)


def _as_u8(x: torch.Tensor, flip: bool) -> torch.Tensor:
    """Stored 8-bit activations as the u8 the kernels read: i8 v becomes v + 128 (bit flip), zp + 128."""
    return torch.bitwise_xor(x.view(torch.uint8), 0x80) if flip else x


def _gemm_type(x, packed, bias, m=None, c=None, table=None, res=None, mb=None, m2=None, c2=None, ks=None, live=None, *,
               n, k_padded,
               flip, kind, out, pre, k, lo, hi, zp, pb, pre2, k2, lo2, hi2, zp2, threads, **gelu):
    if x.dtype not in (torch.uint8, torch.int8) or packed.dtype != torch.int8:
        raise OpError(f"cpu.int_gemm: expects an 8-bit input and packed int8 weights, got {x}, {packed}")
    return TensorType(INT_DTYPES[out], x.shape[:-1] + (n,))


@register_op("cpu.int_gemm",
             inputs=["x", "packed", "bias", "m?", "c?", "table?", "res?", "mb?", "m2?", "c2?", "ks?", "live?"],
             attrs={"n": Attr("int"), "k_padded": Attr("int"), "flip": Attr("bool", False), "pb": Attr("int", 0),
                    **_EPILOGUE, **_SECOND, **_GELU},
             infer=_gemm_type, tags=["gemm", "integer"])
def int_gemm(x, packed, bias, m=None, c=None, table=None, res=None, mb=None, m2=None, c2=None, ks=None, live=None, *,
             n, k_padded, flip, kind, out, pre, k, lo, hi, zp, pb, pre2, k2, lo2, hi2, zp2, threads, gelu_x, gelu_n,
             gelu_bits, gelu_in_bits):
    """epilogue(x [..., K] as u8 @ W^T), W packed by ``cpu_integer_library.pack_b`` (K padded to k_padded);
    ``ks``: the requant's shift per column instead of ``k`` (layers of different shifts sharing one GEMM);
    gelu_*: int.shiftgelu's attributes when the table is shiftgelu(y + zp) (gelu_x 0: not known);
    ``live`` (u8, broadcast to x's rows): only its nonzero rows are computed, the others are 0."""
    lead = x.shape[:-1]
    a = _as_u8(x, flip).reshape(-1, x.shape[-1])
    if a.shape[1] != k_padded:
        a = F.pad(a, (0, k_padded - a.shape[1]))
    a = a.contiguous()
    y = torch.empty(a.shape[0], n, dtype=INT_DTYPES[out])
    if res is not None:
        res = res.reshape(-1, n).contiguous()
    second = {"m": m2, "c": c2, "pre": pre2, "k": k2, "lo": lo2, "hi": hi2, "zp": zp2}
    epi = _epilogue(kind, out, bias, m, c, table, res, mb, second, pre=pre, k=k, lo=lo, hi=hi, zp=zp, pb=pb, ks=ks,
                    gelu=(gelu_x, gelu_n, gelu_bits, gelu_in_bits))
    kernels.gemm(a, packed, n, epi, y, threads, _rows(live, lead))
    return y.reshape(lead + (n,))


def _rows(live: torch.Tensor | None, lead) -> torch.Tensor | None:
    """``live`` as one u8 per row of a [*lead, C] tensor, contiguous."""
    return None if live is None else live.expand(lead).reshape(-1).contiguous()


def _bmm_type(a, b, bias, m=None, c=None, pow2=None, mask=None, sizes=None, table=None, mb=None, m2=None, c2=None,
              live=None, *,
              a_zp, flip_a, flip_b, X, n_pow, bits, kind, out, pre, k, lo, hi, zp, pb, pre2, k2, lo2, hi2, zp2,
              out_perm, threads):
    if a.rank not in (3, 4) or b.rank != a.rank:
        raise OpError(f"cpu.int_bmm: expects 3-D or 4-D operands of the same rank, got {a}, {b}")
    if out_perm and (a.rank != 4 or sorted(out_perm) != [0, 1, 2, 3] or out_perm[-1] != 3 or pow2 is not None):
        raise OpError(f"cpu.int_bmm: out_perm {tuple(out_perm)} must permute 4-D operands' axes, keep the last one "
                      f"last, and comes without Shiftmax (pow2); got {a}")
    if kind == "add_requant" and None in (pow2, sizes, table, m, c, mb, m2, c2):
        raise OpError("cpu.int_bmm: kind add_requant needs Shiftmax (pow2), the size term (sizes, table) and m, c, mb, "
                      "m2, c2")
    if kind == "requant_requant" and (pow2 is not None or None in (m, c, m2, c2) or a.rank != 4
                                      or not all(dims_equal(v.numel(), a.shape[1] * b.shape[-1]) for v in (m2, c2))):
        raise OpError(f"cpu.int_bmm: kind requant_requant (no Shiftmax) needs m, c and m2, c2 of one column row per "
                      f"item of a's second axis ({a.shape[1]} x {b.shape[-1]}), got {m2}, {c2}")
    shape = a.shape[:-1] + (b.shape[-1],)
    if out_perm:
        shape = tuple(shape[d] for d in out_perm)
    return TensorType(torch.uint8 if pow2 is not None else INT_DTYPES[out], shape)


@register_op("cpu.int_bmm",
             inputs=["a", "b", "bias", "m?", "c?", "pow2?", "mask?", "sizes?", "table?", "mb?", "m2?", "c2?", "live?"],
             attrs={"a_zp": Attr("int", 0), "flip_a": Attr("bool", False), "flip_b": Attr("bool", False),
                    "X": Attr("int", 0), "n_pow": Attr("int", 0), "bits": Attr("int", 8), "pb": Attr("int", 0),
                    "out_perm": Attr("ints", (), "the output written as permute(result, out_perm) (the heads "
                                     "merged back: [B, H, T, D] as [B, T, H, D]); () for the result itself"),
                    **_EPILOGUE, **_SECOND},
             infer=_bmm_type, tags=["gemm", "integer"])
def int_bmm(a, b, bias, m=None, c=None, pow2=None, mask=None, sizes=None, table=None, mb=None, m2=None, c2=None,
            live=None, *, a_zp, flip_a, flip_b, X, n_pow, bits, kind, out, pre, k, lo, hi, zp, pb, pre2, k2, lo2, hi2,
            zp2, out_perm, threads):
    """epilogue(a @ b) per batch (a u8 with zero point a_zp, b s8), then (masked) Shiftmax rows when pow2 is given,
    with table[clamp(sizes)] added to the logits first when sizes is given (kind add_requant: int.add of the raw
    accumulator and that term, then the m2, c2 requant); ``live`` (u8, broadcast to the output's rows): only its
    nonzero rows are computed, the others are 0. With out_perm the kernel writes the permuted layout itself."""
    inverse = [out_perm.index(d) for d in range(len(out_perm))] if out_perm else None
    if inverse is not None and live is not None:         # live follows the output's rows: back to the result's
        live = live.expand(tuple(a.shape[d] for d in out_perm[:-1])).permute(inverse[:-1])
    squeeze = a.dim() == 3
    if squeeze:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
        live = None if live is None else live.unsqueeze(0)
    a = _as_u8(a, flip_a)
    if a.stride(-1) != 1:
        a = a.contiguous()
    dtype = torch.uint8 if pow2 is not None else INT_DTYPES[out]
    result = a.shape[:-1] + (b.shape[-1],)
    if inverse is None:
        y = torch.empty(result, dtype=dtype)
    else:
        written = torch.empty(tuple(result[d] for d in out_perm), dtype=dtype)
        y = written.permute(inverse)
    logits = None
    if kind == "add_requant":
        second = {"m": m2, "c": c2, "pre": pre2, "k": k2, "lo": lo2, "hi": hi2, "zp": zp2}
        logits = _epilogue(kind, "i32", None, m, c, None, None, mb, second, pre=pre, k=k, lo=lo, hi=hi, zp=zp, pb=pb)
        kind, m, c = "raw", None, None
    second = {"m": m2, "c": c2, "pre": pre2, "k": k2, "lo": lo2, "hi": hi2, "zp": zp2} if kind == "requant_requant" else None
    epi = _epilogue(kind, out, bias, m, c, None, second=second, pre=pre, k=k, lo=lo, hi=hi, zp=zp)
    sm = None if pow2 is None else kernels.softmax(pow2, X, n_pow, bits, mask, tuple(y.shape), sizes, table, logits)
    kernels.bmm(a, b.view(torch.int8), a_zp, flip_b, epi, y, threads, sm,
                None if live is None else live.expand(a.shape[:-1]))
    if inverse is not None:
        return written
    return y.squeeze(0) if squeeze else y


def _ln_type(x, m=None, c=None, live=None, *, C, sh, F, iters, kind, out, pre, k, lo, hi, zp, threads):
    if x.dtype != torch.int32:
        raise OpError(f"cpu.int_layernorm: expects int32, got {x}")
    return x.with_dtype(INT_DTYPES[out])


@register_op("cpu.int_layernorm", inputs=["x", "m?", "c?", "live?"],
             attrs={"C": Attr("int"), "sh": Attr("int", 0), "F": Attr("int", 14), "iters": Attr("int", 20), **_EPILOGUE},
             infer=_ln_type, tags=["integer"])
def int_layernorm(x, m=None, c=None, live=None, *, C, sh, F, iters, kind, out, pre, k, lo, hi, zp, threads):
    """int.layernorm over rows, then (kind requant) the per-channel requant of its consumer; ``live``: as in
    cpu.int_gemm."""
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=INT_DTYPES[out])
    rq = None if kind == "raw" else _epilogue(kind, out, None, m, c, None, pre=pre, k=k, lo=lo, hi=hi, zp=zp)
    kernels.layernorm(x, sh, F, iters, rq, y, threads, _rows(live, x.shape[:-1]))
    return y


def _shiftmax_type(x, pow2, mask=None, sizes=None, table=None, *, X, n_pow, bits, threads):
    if x.dtype != torch.int32 or not 1 <= x.rank <= 4:
        raise OpError(f"cpu.int_shiftmax: expects int32 of rank 1 to 4, got {x}")
    return x.with_dtype(torch.uint8)


@register_op("cpu.int_shiftmax", inputs=["x", "pow2", "mask?", "sizes?", "table?"], attrs={"X": Attr("int"), "n_pow": Attr("int"),
                                                               "bits": Attr("int"), "threads": Attr("int", 1)},
             infer=_shiftmax_type, tags=["integer"])
def int_shiftmax(x, pow2, mask=None, sizes=None, table=None, *, X, n_pow, bits, threads):
    """int.shiftmax over the last axis; pow2[u] = shift_pow2(u, X, n_pow) for u in [0, n_pow X]; with sizes,
    table[clamp(sizes)] is added to x first (proportional attention)."""
    x4 = x.reshape((1,) * (4 - x.dim()) + tuple(x.shape)).contiguous()
    y = torch.empty(x4.shape, dtype=torch.uint8)
    kernels.shiftmax(x4, kernels.softmax(pow2, X, n_pow, bits, mask, tuple(x4.shape), sizes, table), y, threads)
    return y.reshape(x.shape)


def _requant_type(x, m, c, live=None, *, kind, out, pre, k, lo, hi, zp, threads):
    if x.dtype not in (torch.uint8, torch.int8, torch.int32):
        raise OpError(f"cpu.int_requant: expects an integer input, got {x}")
    return x.with_dtype(INT_DTYPES[out])


@register_op("cpu.int_requant", inputs=["x", "m", "c", "live?"], attrs=_EPILOGUE, infer=_requant_type, tags=["integer"])
def int_requant(x, m, c, live=None, *, kind, out, pre, k, lo, hi, zp, threads):
    """int.requant with m, c given per column of the last axis; ``live``: as in cpu.int_gemm."""
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=INT_DTYPES[out])
    kernels.requant(x, _epilogue("requant", out, None, m, c, None, pre=pre, k=k, lo=lo, hi=hi, zp=zp), y, threads,
                    _rows(live, x.shape[:-1]))
    return y


def _add_type(a, b, ma, mb, c, live=None, *, pb, kind, out, pre, k, lo, hi, zp, threads):
    if a.dtype != torch.int32 or b.dtype != torch.int32:
        raise OpError(f"cpu.int_add: expects int32 operands, got {a}, {b}")
    return a.with_dtype(INT_DTYPES[out])


@register_op("cpu.int_add", inputs=["a", "b", "ma", "mb", "c", "live?"], attrs={"pb": Attr("int", 0), **_EPILOGUE},
             infer=_add_type, tags=["integer"])
def int_add(a, b, ma, mb, c, live=None, *, pb, kind, out, pre, k, lo, hi, zp, threads):
    """int.add with per-column constants; b broadcasts to a's shape; ``live``: as in cpu.int_gemm."""
    a, b = a.contiguous(), _repeated_rows(b.expand(a.shape))
    y = torch.empty(a.shape, dtype=INT_DTYPES[out])
    kernels.add(a, b, _epilogue("add", out, None, ma, c, None, mb=mb, pre=pre, k=k, lo=lo, hi=hi, zp=zp, pb=pb), y,
                threads, _rows(live, a.shape[:-1]))
    return y


def _repeated_rows(b: torch.Tensor) -> torch.Tensor:
    """The rows kernels.add repeats to make b: its block after the leading axes it broadcasts over (stride 0), when
    that block is contiguous (a position embedding added to every image is read in place), else b copied."""
    lead = 0
    while lead < b.dim() - 1 and b.stride(lead) == 0:
        lead += 1
    block = b[(0,) * lead]
    return block if block.is_contiguous() else b.contiguous()


def _summed_keys(keys: TensorType, heads_axis: int) -> TensorType:
    """The [B, N, d] keys the merge scores: ``keys`` itself, or their int32 sum over axis heads_axis (1 or 2)."""
    if not heads_axis:
        return keys
    if keys.rank != 4 or keys.dtype not in INT_DTYPES.values() or heads_axis not in (1, 2):
        raise OpError(f"cpu.int_token_merge: keys summed over heads (heads_axis {heads_axis}, 1 or 2) must be 8- or "
                      f"32-bit [B, H, N, d] or [B, N, H, d], got {keys}")
    return TensorType(torch.int32, tuple(d for i, d in enumerate(keys.shape) if i != heads_axis))


def _token_merge_type(x, keys, sizes, *, r, protected, shift, heads_axis, threads):
    return _int_token_merge_type(x, _summed_keys(keys, heads_axis), sizes, r=r, protected=protected, shift=shift)


@register_op("cpu.int_token_merge", inputs=["x", "keys", "sizes"],
             attrs={"r": Attr("int"), "protected": Attr("int", 0), "shift": Attr("int", 0),
                    "heads_axis": Attr("int", 0, "keys are summed over this axis first (cpu_integer_layout."
                                       "fold_key_head_sums); 0: keys are [B, N, d]"),
                    "threads": Attr("int", 1)},
             infer=_token_merge_type, tags=["integer", "tokens"])
def int_token_merge(x, keys, sizes, *, r, protected, shift, heads_axis, threads):
    """int.token_merge: scores, matching and size-weighted merge in one kernel, threaded over the batch."""
    r = effective_r(x.shape[1], r, protected)
    if r == 0:
        return x, sizes
    return tokens.token_merge(x, keys, sizes, r, protected, shift, threads, heads_axis)


@register_cost("cpu.int_token_merge")
def _kernel_token_merge_cost(node):
    keys, axis = node.inputs[1].type, node.attrs["heads_axis"]
    return _token_merge_cost(node, keys=_summed_keys(keys, axis)) + (_n(keys) if axis else 0)


def _quantize_type(x, *, inv_scale, zero_point, lo, hi, dtype, threads, patch=()):
    if not x.dtype.is_floating_point or dtype not in INT_DTYPES:
        raise OpError(f"cpu.int_quantize: expects a float input and an integer dtype, got {x}, {dtype!r}")
    if not patch:
        return x.with_dtype(INT_DTYPES[dtype])
    _check_image(tuple(x.shape), patch)
    ph, pw, C, H, W = patch
    return TensorType(INT_DTYPES[dtype], (x.shape[0], H // ph, W // pw, C, ph, pw))


def _check_image(shape: tuple, patch) -> None:
    """patch = (ph, pw, C, H, W): the images [B, C, H, W] the quantizer was lowered for, H and W in whole patches."""
    ph, pw, C, H, W = patch
    if H % ph or W % pw:
        raise OpError(f"cpu.int_quantize: {H} x {W} images do not split into {ph} x {pw} patches")
    if len(shape) != 4 or tuple(shape[1:]) != (C, H, W):
        raise OpError(f"cpu.int_quantize: lowered for images [B, {C}, {H}, {W}] (the patchify after it is folded "
                      f"into it), got an input of shape {list(shape)}; lower the graph again for that shape")


@register_op("cpu.int_quantize", inputs=["x"],
             attrs={"inv_scale": Attr("float"), "zero_point": Attr("int", 0), "lo": Attr("int"), "hi": Attr("int"),
                    "dtype": Attr("str", "i32"), "threads": Attr("int", 1),
                    "patch": Attr("ints", (), "(ph, pw, C, H, W): images [B, C, H, W] quantized into their ph x pw "
                                              "patches, [B, H/ph, W/pw, C, ph, pw] (a ViT's patchify folded in)")},
             infer=_quantize_type, tags=["quant", "integer"])
def int_quantize(x, *, inv_scale, zero_point, lo, hi, dtype, threads, patch=()):
    """int.quantize: clamp(floor(x * inv_scale + 0.5), lo, hi) + zero_point in float32."""
    if patch:
        _check_image(tuple(x.shape), patch)
        return edges.quantize_patches(x, tuple(patch[:2]), inv_scale, lo, hi, zero_point, INT_DTYPES[dtype], threads)
    return edges.quantize(x, inv_scale, lo, hi, zero_point, INT_DTYPES[dtype], threads)


def _dequantize_type(x, scale, offset=None, *, zero_point, threads):
    if x.dtype not in (torch.uint8, torch.int8, torch.int32) or scale.dtype != torch.float32 or scale.rank != 1:
        raise OpError(f"cpu.int_dequantize: expects an 8/32-bit input and a float32 vector scale, got {x}, {scale}")
    return x.with_dtype(torch.float32)


@register_op("cpu.int_dequantize", inputs=["x", "scale", "offset?"],
             attrs={"zero_point": Attr("int", 0), "threads": Attr("int", 1)},
             infer=_dequantize_type, tags=["quant", "integer"])
def int_dequantize(x, scale, offset=None, *, zero_point, threads):
    """int.dequantize: (x - zero_point) * scale (+ offset), scale and offset given per column of the last axis."""
    return edges.dequantize(x, zero_point, scale, offset, threads)


@register_cost("cpu.int_gemm")
def _gemm_cost(node):
    x = node.inputs[0].type
    return 2 * _n(x) * node.attrs["n"]


@register_cost("cpu.int_bmm")
def _bmm_cost(node):
    return 2 * _n(node.output.type) * node.inputs[0].type.shape[-1]


register_elementwise_cost(20, "cpu.int_shiftmax")
register_elementwise_cost(10, "cpu.int_layernorm")
register_elementwise_cost(5, "cpu.int_requant")
register_elementwise_cost(7, "cpu.int_add")
register_elementwise_cost(3, "cpu.int_quantize", "cpu.int_dequantize")
