"""The text form: one line per node, stable across runs.

    graph main(%x: f32[batch,197,384]) {
      %w3: f32[384,384] = constant
      %7: f32[batch,197,384] = linear(%6, %w3, %b3)
      %8: f32[batch,197,384] = softmax(%7, dim=-1)
      return %8
    }
"""
from __future__ import annotations

import torch
import sympy

from graphopt.ir.types import DTYPE_NAMES, TensorType, format_dim


def format_attr(value) -> str:
    if isinstance(value, torch.dtype):
        return DTYPE_NAMES.get(value, str(value))
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(format_attr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_attr(v)}" for k, v in value.items()) + "}"
    if isinstance(value, sympy.Expr):
        return format_dim(value)
    if isinstance(value, (TensorType, str)):
        return str(value)
    return repr(value)


def format_node(node) -> str:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    args = ["%" + v.name if v is not None else "None" for v in node.inputs]
    args += [f"{k}={format_attr(v)}" for k, v in node.attrs.items()]
    return f"{outs} = {node.op}({', '.join(args)})"


def format_graph(graph, show_constants: bool = True) -> str:
    params = ", ".join(f"%{v.name}: {v.type}" for v in graph.inputs)
    lines = [f"graph {graph.name}({params}) {{"]
    if show_constants:
        lines += [f"  %{v.name}: {v.type} = constant" for v in graph.constants.values()]
    lines += ["  " + format_node(n) for n in graph.nodes]
    lines.append("  return " + ", ".join("%" + v.name for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)
