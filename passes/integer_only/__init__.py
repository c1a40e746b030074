"""``integer_only``: post-training conversion of a transformer to integer-only arithmetic (I-ViT).

    linear/conv2d(x, W, b)      -> int.linear/int.conv2d(u8 x, i8 W per-channel, i32 b)   (int32 acc)
    matmul(a, b) (activations)  -> int.matmul(u8 a, i8 b)
    mul/div(x, positive scalar) -> folded into x's scale (no op)
    where(mask, s, -inf); softmax -> int.requant; int.shiftmax(s, mask)
    gelu(x)                     -> int.requant; int.shiftgelu
    layer_norm(x, g, b)         -> int.layernorm (g and b go into the next requant)
    add(a, b)                   -> int.add (per-branch dyadic multipliers, 16-bit residual stream)
    embedding(W, ids)           -> embedding(int W, ids)
    reshape/permute/index_select/... -> the same op on the integer tensor
    graph inputs / outputs      -> int.quantize / int.dequantize (the only float ops left)

Every scale change is a dyadic ``int.requant`` (m / 2^k, chosen at compile time). Ops that
cannot be converted stay in float between an ``int.dequantize`` and an ``int.quantize``; the
report lists them and ``strict=True`` makes them an error. Calibration: per-tensor ranges by
min/max, percentile or MSE-optimal clipping for the 8-bit GEMM inputs (16-bit tensors use min/max);
``smoothquant=alpha`` migrates per-channel outliers of GEMM inputs into the weights (in the requant, no extra op).

The package, one idea a module: ``dyadic`` (choosing int32-safe dyadic rescales), ``form`` (``Q``,
how a float value is held as integers), ``convert`` (the op-by-op conversion), ``bias_folding``
(int.linear biases moved into the requants after them) and ``tokens`` (token_merge and
integer_only in either order).
"""
from __future__ import annotations

from collections import Counter
from typing import Literal

import torch

from graphopt.ir import Graph, Value
from graphopt.ir.traversal import descendants
from graphopt.passes.calibration import collect_stats
from graphopt.passes.registry import option, register_pass


class IntegerConversionError(ValueError):
    """The graph (or its calibration data) cannot be converted as asked."""


# the modules below raise IntegerConversionError
from graphopt.passes.integer_only.bias_folding import fold_biases  # noqa: E402
from graphopt.passes.integer_only.convert import Converter  # noqa: E402
from graphopt.passes.integer_only.form import is_float  # noqa: E402


@register_pass("integer_only", tolerance=None)
def integer_only(graph: Graph, ctx, *,
                 method: Literal["minmax", "percentile", "mse"] = option("mse", "clipping of 8-bit GEMM inputs"),
                 percentile: float = option(99.99, "percentile for method=percentile"),
                 act_bits: int = option(8, "bits of GEMM inputs (<= 8: ONNX MatMulInteger)"),
                 resid_bits: int = option(16, "bits of the residual stream, embeddings and other int32 tensors"),
                 attn_bits: int = option(8, "bits of attention probabilities (Shiftmax output, <= 8)"),
                 smoothquant: float = option(0.0, "SmoothQuant alpha: per-channel migration of GEMM-input outliers into the weights (0 = off)"),
                 strict: bool = option(False, "fail instead of leaving unconvertible ops in float"),
                 max_tokens: int = option(512, "softmax length assumed when it is symbolic")) -> None:
    """Convert the graph to integer-only arithmetic (I-ViT: dyadic requant, Shiftmax, ShiftGELU, I-LayerNorm)."""
    if not 2 <= act_bits <= 8:
        raise IntegerConversionError(f"act_bits must be 2..8 (GEMM inputs are 8-bit integers), got {act_bits}")
    if not 8 <= resid_bits <= 16:
        raise IntegerConversionError(f"resid_bits must be 8..16, got {resid_bits}")
    if not 2 <= attn_bits <= 8:
        raise IntegerConversionError(f"attn_bits must be 2..8, got {attn_bits}")
    batches = ctx.require_calibration()
    _check_batches(graph, batches)
    if graph.find_nodes("sdpa"):
        from graphopt.passes.decompose_attention import decompose_attention
        decompose_attention(graph, ctx)
    _drop_nan_guards(graph)
    values = [v for v in graph.inputs if is_float(v)] + [o for n in graph.nodes for o in n.outputs if is_float(o)]
    masks = _static_masks(graph)
    stats = collect_stats(graph, batches, values + masks)
    conv = Converter(graph, stats, dict(method=method, percentile=percentile, act_bits=act_bits,
                                         resid_bits=resid_bits, attn_bits=attn_bits, max_tokens=max_tokens,
                                         smoothquant=smoothquant))
    conv.all_true = {id(m) for m in masks if stats[m.name].lo == 1.0}
    conv.run()
    fold_biases(graph)
    if conv.fallback:
        listing = ", ".join(conv.fallback)
        if strict:
            raise IntegerConversionError(f"strict=True: these ops cannot be converted to integer arithmetic: {listing}")
        ctx.note(f"left in float (between int.dequantize and int.quantize): {_by_op(conv.fallback_reasons)}")
    ctx.count("converted", conv.converted)
    ctx.details["integer_coverage"] = {"converted": dict(conv.converted_ops), "left_in_float": conv.fallback_reasons}
    ctx.count("float_fallback", len(conv.fallback))
    graph.meta["integer_only"] = {"fallback": list(conv.fallback), "float_ops": float_ops(graph)}


def _drop_nan_guards(graph: Graph) -> None:
    """``where(isnan(p), c, p)`` after a softmax over the last axis (the ONNX exporter's guard for fully
    masked rows) is ``p`` once that softmax is Shiftmax, whose integer probabilities are never NaN."""
    for node in graph.find_nodes("where"):
        cond, fill, p = node.inputs
        check = cond.producer
        if check is None or check.op != "isnan" or check.inputs[0] is not p or p.producer is None \
                or p.producer.op != "softmax" or p.producer.attrs["dim"] not in (-1, p.type.rank - 1) \
                or not fill.is_constant:
            continue
        graph.replace_all_uses_with(node.output, p)
        graph.erase_node(node)
        if not check.output.uses:
            graph.erase_node(check)


def _by_op(fallback: list[dict]) -> str:
    """'tanh x2 (no integer form of this op), ...': the fallbacks counted by op and reason."""
    counts = Counter((f["op"], f["reason"]) for f in fallback)
    return ", ".join(f"{op} x{n} ({reason})" for (op, reason), n in counts.items())


def _static_masks(graph: Graph) -> list[Value]:
    """Bool attention masks (``where`` conditions) that depend on no graph input's data (only on
    shapes); when they are all True on the calibration set they are dropped (ViT's all-true mask)."""
    dependent = {id(v) for v in graph.inputs} | {id(o) for n in descendants(graph.inputs) for o in n.outputs}
    out = {}
    for n in graph.find_nodes("where"):
        cond = n.inputs[0]
        if cond.type.dtype == torch.bool and id(cond) not in dependent and not cond.is_constant:
            out[id(cond)] = cond
    return list(out.values())



def _check_batches(graph: Graph, batches) -> None:
    for i, batch in enumerate(batches):
        if len(batch) != len(graph.inputs):
            raise IntegerConversionError(f"calibration item {i} has {len(batch)} tensors; the graph takes "
                                         f"{len(graph.inputs)} ({', '.join(v.name for v in graph.inputs)})")
        for v, t in zip(graph.inputs, batch):
            if not isinstance(t, torch.Tensor) or t.dim() != v.type.rank or t.dtype != v.type.dtype or any(
                    isinstance(d, int) and t.shape[a] != d for a, d in enumerate(v.type.shape)):
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise IntegerConversionError(f"calibration item {i}: input %{v.name} is {got}, the graph expects {v.type}")


def float_ops(graph: Graph) -> list[str]:
    """Nodes computing in floating point other than the edge quantizers (empty for an integer-only graph)."""
    found = []
    for n in graph.nodes:
        if n.op in ("int.quantize", "int.dequantize"):
            continue
        if any(is_float(v) for v in n.outputs) or any(is_float(v) for v in n.inputs):
            found.append(n.label())
    return found
