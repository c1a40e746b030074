"""ONNX lowering of ``sparse_linear``: the weight written back DENSE (MatMul with Wᵀ, then Add bias).

ONNX Runtime turns sparse initialisers into dense tensors when it loads a model, and standard ONNX
has no SpMM, so an ONNX file gains nothing from unstructured or 1x4-block sparsity: the lowering says
so by writing the dense matrix (its zeros compress well on disk). Structured pruning (``sparsify``
with ``pattern=neurons|heads|structured``) is what makes the ONNX model faster: its GEMMs are smaller.
"""
from __future__ import annotations

from graphopt.backends.onnx.emitter import register_lowering
from graphopt.ir.onnx_common import tensor_to_proto
from graphopt.ir.ops.sparse import OP, densify


@register_lowering(OP)
def _sparse_linear(em, node):
    dtype = node.outputs[0].type.dtype
    row_ptr, col, values = (v.const for v in node.inputs[1:4])
    w = densify(node.attrs["format"], row_ptr, col, values, node.attrs["out_features"], node.attrs["in_features"])
    key = ("sparse_linear_dense_T", id(node.inputs[3]), dtype)
    if key not in em.cache:
        name = em.fresh(f"{node.inputs[3].name}_dense_T")
        em.initializers.append(tensor_to_proto(w.t().contiguous().to(dtype), name))
        em.cache[key] = name
    y = em.one("MatMul", [em.input(node, 0, dtype), em.cache[key]])
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        return em.one("Add", [y, em.input(node, 4, dtype)], em.out(node))
    return em.one("Identity", [y], em.out(node))
