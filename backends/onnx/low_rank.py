"""ONNX lowering of ``low_rank_mlp``: the unfused MatMul chain in standard ai.onnx ops.

    MatMul(x, V1ᵀ) -> MatMul(·, U1ᵀ) -> Add(b1) -> act -> MatMul(·, V2ᵀ) -> MatMul(·, U2ᵀ) -> Add(b2)

ONNX Runtime has no fused kernel for it, so the saving there is the factorisation's FLOPs, not the
peak memory. Transposed factors are written as initializers once (no run-time Transpose).
"""
from __future__ import annotations

from graphopt.backends.onnx.elementwise import emit_activation
from graphopt.backends.onnx.emitter import register_lowering
from graphopt.ir.ops.low_rank import OP


def _factor(em, node, i, dtype):
    value = node.inputs[i]
    if value.is_constant:
        return em.constant(value, dtype if value.type.dtype != dtype else None, transform="T")
    return em.one("Transpose", [em.input(node, i, dtype)], perm=[1, 0])


@register_lowering(OP)
def _low_rank_mlp(em, node):
    dtype = node.outputs[0].type.dtype
    x = em.input(node, 0, dtype)
    p = em.one("MatMul", [x, _factor(em, node, 1, dtype)])
    hidden = em.one("Add", [em.one("MatMul", [p, _factor(em, node, 2, dtype)]), em.input(node, 3, dtype)])
    hidden = emit_activation(em, hidden, node.attrs["activation"], dtype)
    q = em.one("MatMul", [hidden, _factor(em, node, 4, dtype)])
    y = em.one("MatMul", [q, _factor(em, node, 5, dtype)])
    return em.one("Add", [y, em.input(node, 6, dtype)], em.out(node))
