"""The text form: one line per node, stable across runs, read back by ``ir/parser.py``.

    graph main(%x: f32[batch,197,384]) {
      %w3: f32[384,384] = constant
      %scale: f32[] = constant(0.125)
      %7: f32[batch,197,384] = linear(%6, %w3, %b3)
      %8: f32[batch,197,384] = softmax(%7, dim=-1)
      %9: f32[batch,197,384] = gelu(%8, approximate="tanh")
      return %9
    }

Constants with at most ``inline_limit`` elements print their values (``constant([1.0,2.0])``);
larger ones print by name, and ``Graph.parse(text, constants={name: tensor})`` supplies them.
Strings are quoted; names that are not plain (``onnx::MatMul_12``) are quoted too.
"""
from __future__ import annotations

import json
import re

import numpy as np
import sympy
import torch

from graphopt.ir.types import DTYPE_NAMES, TensorType, format_dim

INLINE_LIMIT = 16  # constants with at most this many elements print their values
PLAIN_NAME = re.compile(r"[A-Za-z0-9_./\-]+")


def format_name(name: str) -> str:
    return name if PLAIN_NAME.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def format_attr(value) -> str:
    if isinstance(value, torch.dtype):
        return DTYPE_NAMES.get(value, str(value))
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(format_attr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_format_key(k)}:{format_attr(v)}" for k, v in value.items()) + "}"
    if isinstance(value, sympy.Expr):
        return format_dim(value)
    if isinstance(value, TensorType):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _format_key(key) -> str:
    return key if isinstance(key, str) and key.isidentifier() else format_attr(key)


def format_tensor(tensor: torch.Tensor) -> str:
    """A tensor's values as a (nested) list literal that parses back to the same bits."""
    if tensor.dtype == torch.bool or not tensor.dtype.is_floating_point:
        return format_attr(tensor.tolist())
    if tensor.dtype == torch.float64:
        text = [repr(float(x)) for x in tensor.reshape(-1).tolist()]
    else:  # the shortest text that rounds back to the same float32 (f16 and bf16 values are float32 values)
        text = [str(x) for x in tensor.detach().float().reshape(-1).numpy().astype(np.float32)]
    return _nest(text, list(tensor.shape))


def _nest(flat: list[str], shape: list[int]) -> str:
    if not shape:
        return flat[0]
    step = len(flat) // shape[0] if shape[0] else 0
    return "[" + ",".join(_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])) + "]"


def format_constant(value, inline_limit: int = INLINE_LIMIT) -> str:
    head = f"%{format_name(value.name)}: {value.type} = constant"
    return head + f"({format_tensor(value.const)})" if value.const.numel() <= inline_limit else head


def format_node(node) -> str:
    outs = ", ".join(f"%{format_name(v.name)}: {v.type}" for v in node.outputs)
    args = ["%" + format_name(v.name) if v is not None else "None" for v in node.inputs]
    args += [f"{k}={format_attr(v)}" for k, v in node.attrs.items()]
    return f"{outs} = {node.op}({', '.join(args)})"


def format_graph(graph, show_constants: bool = True, inline_limit: int = INLINE_LIMIT) -> str:
    params = ", ".join(f"%{format_name(v.name)}: {v.type}" for v in graph.inputs)
    lines = [f"graph {format_name(graph.name)}({params}) {{"]
    if show_constants:
        lines += ["  " + format_constant(v, inline_limit) for v in graph.constants.values()]
    lines += ["  " + format_node(n) for n in graph.nodes]
    lines.append("  return " + ", ".join("%" + format_name(v.name) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)
