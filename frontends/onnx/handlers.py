"""The ONNX handler registry: an ONNX op type -> the function that translates such a node into IR ops.

A handler gets the converter, the ONNX node and its inputs as IR Values (None for an omitted
optional input) and returns the IR Value(s) for the node's outputs, or raises ``Unsupported`` to
keep the node as an ``onnx_opaque`` node. Shape-like inputs (a Reshape's target, Slice's starts)
are read from ``cv.known_ints``: small integer tensors evaluated symbolically (``shape_eval``),
so ``Shape(x)[0]`` is the dim ``batch``, not a runtime value.

Handlers are registered under the op type for the ai.onnx domain, ``domain::OpType`` for other
domains (``handler_key``). The built-in ones are in ``handlers_math``, ``handlers_nn`` and
``handlers_shape``; a plugin adds its own with ``@handles("MyOp")`` from a module named in the
entry-point group ``graphopt.onnx_handlers``. An op type that has a handler already is refused
unless ``replace=True``.
"""
from __future__ import annotations

from typing import Callable

import onnx

from graphopt.frontends import Unsupported
from graphopt.ir.registry import Registry

HANDLERS: Registry[Callable] = Registry("ONNX handler", group="graphopt.onnx_handlers")
handles = HANDLERS.decorator


def handler_key(domain: str, op_type: str) -> str:
    """``Relu`` for the ai.onnx domain (``domain`` ""), ``com.microsoft::FusedMatMul`` for others."""
    return f"{domain}::{op_type}" if domain else op_type


def attributes(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        if a.ref_attr_name:
            raise Unsupported("attribute reference (inside a function body)")
        value = onnx.helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def input_name(node, i) -> str:
    return node.input[i] if i < len(node.input) else ""


__all__ = ["HANDLERS", "attributes", "handler_key", "handles", "input_name"]
