"""IR -> ONNX ``ModelProto``: the emitter and the ``onnx`` kernels, by op category.

    to_onnx(graph, opset=None, value_info=False)

``emitter`` walks the graph and picks each node's kernel from the kernel table
(``backends/kernels.py``, target ``onnx``); ``dims`` writes symbolic dims; ``elementwise``, ``nn``,
``shape``, ``integer``, ``tokens``, ``low_rank``, ``acm`` and ``sparse`` lower the IR ops of those families; ``opaque``
writes ONNX nodes kept as read back verbatim and lowers ATen ``opaque`` nodes by target.

A new lowering is a kernel of target ``onnx``: ``@register_lowering("my.op")`` (the same as
``@register_kernel("onnx", "my.op")``), or ``@register_aten_lowering("aten::flip")`` for an ATen
target; a plugin package registers its own through the ``graphopt.kernels`` entry-point group.
Every registered op has a lowering or is listed in ``NOT_LOWERED`` with the reason.
"""
from graphopt.backends.onnx.emitter import DEFAULT_OPSET, MIN_OPSET, Emitter, register_lowering, to_onnx
from graphopt.backends.onnx import acm, elementwise, integer, low_rank, nn, opaque, shape, sparse, tokens  # noqa: F401  (register)
from graphopt.backends.onnx.opaque import ATEN_LOWERINGS, register_aten_lowering

# IR op -> why it has no ONNX lowering (tests/test_onnx_coverage.py keeps this table and the kernels in step)
NOT_LOWERED: dict[str, str] = {
    **{op: "a fused kernel of the cpu_integer backend (the standard-op ONNX gets the int.* chain it replaces; "
           "to_onnx_custom_ops writes it as a custom op of graphopt's ONNX Runtime library)"
       for op in ("cpu.int_gemm", "cpu.int_bmm", "cpu.int_layernorm", "cpu.int_shiftmax", "cpu.int_requant",
                  "cpu.int_add", "cpu.int_spmm", "cpu.int_token_merge", "cpu.int_quantize", "cpu.int_dequantize")},
    "cpu.live_rows": "the padding-row check feeding cpu_integer's fused kernels; the standard-op ONNX computes every "
                     "row, and to_onnx_custom_ops writes the check in standard ops beside the custom ops",
}

__all__ = ["ATEN_LOWERINGS", "DEFAULT_OPSET", "Emitter", "MIN_OPSET", "NOT_LOWERED", "register_aten_lowering",
           "register_lowering", "to_onnx"]
