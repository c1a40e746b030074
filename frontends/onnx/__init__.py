"""The ONNX frontend: an ``.onnx`` file (opsets 13 to the newest ``onnx`` knows) into the IR.

    load        reading a file safely (bounded, regular files only), external data, sparse initializers
    validate    well-formed tensors, types and strings; opset range, single definitions, no cycles
    opset       files older than opset 13, converted with ``onnx.version_converter``
    convert     the ONNX graph -> IR conversion (``from_onnx``)
    handlers    the handler registry (op type -> IR translation); the built-in handlers are in
                ``handlers_math``, ``handlers_nn`` and ``handlers_shape``
    shape_eval  symbolic evaluation of shape subgraphs (``Shape -> Gather -> Concat``)
    opaque      ``onnx_opaque`` nodes for ops without a translation, and their output types
"""
from graphopt.frontends import OnnxLoadError
from graphopt.frontends.onnx.convert import from_onnx
from graphopt.frontends.onnx.handlers import HANDLERS, handles
from graphopt.frontends.onnx.load import check_external_data, load_external, load_model, parse_model
from graphopt.frontends.onnx.opset import CONVERT_TO_OPSET, OpsetConverted, upgrade_opset
from graphopt.frontends.onnx.validate import MAX_OPSET, MIN_OPSET, check_model_structure

__all__ = ["CONVERT_TO_OPSET", "HANDLERS", "MAX_OPSET", "MIN_OPSET", "OnnxLoadError", "OpsetConverted",
           "check_external_data", "check_model_structure", "from_onnx", "handles", "load_external", "load_model",
           "parse_model", "upgrade_opset"]
