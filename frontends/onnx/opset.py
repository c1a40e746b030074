"""Files older than ``MIN_OPSET`` are read through ``onnx.version_converter`` (to ``CONVERT_TO_OPSET``),
with an ``OpsetConverted`` warning; a conversion that fails, or that changes the type of a graph
input or output, is refused naming the op."""
from __future__ import annotations

import re
import warnings

import onnx
from onnx import helper

from graphopt.frontends import OnnxLoadError
from graphopt.frontends.onnx.load import first_line
from graphopt.frontends.onnx.validate import MIN_OPSET, node_label, opsets_of

CONVERT_TO_OPSET = 17  # older files are converted to this opset (onnx.version_converter)


def upgrade_opset(model: onnx.ModelProto, where: str = "model") -> onnx.ModelProto:
    """A model below ``MIN_OPSET`` converted to ``CONVERT_TO_OPSET`` by ``onnx.version_converter``
    (with a warning saying so); others unchanged. A conversion that fails names the op."""
    version = opsets_of(model).get("")
    if version is None or version >= MIN_OPSET:
        return model
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, CONVERT_TO_OPSET)
    except Exception as e:  # the converter raises RuntimeError with an assertion text
        label = _unconvertible_node(model, str(e))
        reason = re.sub(r"^.*Assertion `.*?` failed: ", "", first_line(e)).strip()
        reason = "it has no adapter for this op" if "%" in reason or not reason else reason
        raise OnnxLoadError(f"{where}: ai.onnx opset {version} is older than {MIN_OPSET} and onnx.version_converter "
                            f"cannot convert {label} to opset {CONVERT_TO_OPSET} ({reason}); re-export the "
                            f"model at opset {MIN_OPSET} or newer, or replace that op") from None
    before = {vi.name: vi.type for vi in list(model.graph.input) + list(model.graph.output)}
    for vi in list(converted.graph.input) + list(converted.graph.output):
        if vi.name in before and _contradicts(before[vi.name], vi.type):  # Scan 8 -> 9 drops the batch axis
            adapted = sorted({n.op_type for n in model.graph.node if _changed_since(n.op_type, version)})
            raise OnnxLoadError(f"{where}: ai.onnx opset {version} is older than {MIN_OPSET}, and onnx.version_converter "
                                f"changes the type of '{vi.name}' while converting it (from "
                                f"{_type_text(before[vi.name])} to {_type_text(vi.type)}; ops it adapts: "
                                f"{', '.join(adapted) or 'none'}); re-export the model at opset {MIN_OPSET} or newer")
    warnings.warn(f"{where}: ai.onnx opset {version} converted to opset {CONVERT_TO_OPSET} with "
                  "onnx.version_converter", OpsetConverted, stacklevel=3)
    return converted


def _changed_since(op_type: str, version: int) -> bool:
    try:
        return onnx.defs.get_schema(op_type, CONVERT_TO_OPSET, "").since_version > version
    except Exception:  # onnx.defs raises SchemaError for ops it does not know
        return False


def _contradicts(before: onnx.TypeProto, after: onnx.TypeProto) -> bool:
    """The converted type disagrees with what the file declared (filling in an unknown is fine)."""
    if not before.HasField("tensor_type"):
        return False
    old, new = before.tensor_type, after.tensor_type
    if old.elem_type and old.elem_type != new.elem_type:
        return True
    if not old.HasField("shape"):
        return False
    if not new.HasField("shape") or len(old.shape.dim) != len(new.shape.dim):
        return True
    return any(a.HasField("dim_value") and a.dim_value != b.dim_value for a, b in zip(old.shape.dim, new.shape.dim))


def _type_text(proto: onnx.TypeProto) -> str:
    if not proto.HasField("tensor_type") or not proto.tensor_type.HasField("shape"):
        return "no shape"
    dims = [str(d.dim_value) if d.HasField("dim_value") else d.dim_param or "?" for d in proto.tensor_type.shape.dim]
    return f"[{','.join(dims)}]"


class OpsetConverted(UserWarning):
    """An ONNX file older than ``MIN_OPSET`` was read through ``onnx.version_converter``."""


def _unconvertible_node(model: onnx.ModelProto, message: str) -> str:
    """The node the converter failed on: the op its message names, else the first node that does not
    convert alone."""
    graph = model.graph
    named = [i for i, n in enumerate(graph.node) if re.search(re.escape(n.op_type), message, re.IGNORECASE)]
    if named:
        i = max(named, key=lambda i: len(graph.node[i].op_type))
        return node_label(graph.node[i], i)
    from onnx import version_converter

    for i, node in enumerate(graph.node):
        alone = helper.make_graph([node], "node", [helper.make_value_info(n, onnx.TypeProto()) for n in node.input if n],
                                  [helper.make_value_info(n, onnx.TypeProto()) for n in node.output if n])
        try:
            version_converter.convert_version(helper.make_model(alone, opset_imports=model.opset_import), CONVERT_TO_OPSET)
        except Exception:  # this one fails alone too
            return node_label(node, i)
    return "the model"


__all__ = ["CONVERT_TO_OPSET", "OpsetConverted", "upgrade_opset"]
