"""The reference interpreter: IR -> an executable ``torch.fx.GraphModule``.

Every node calls its op's reference implementation (opaque nodes call their ATen target), so
this is the semantics every backend is compared against, and what passes run for calibration
and numerical checks. Symbolic dims in attributes (a reshape to ``[batch*197, 384]``) are
computed at run time from the input sizes. A backend may swap in its own kernels for some ops.
"""
from __future__ import annotations

import operator
from typing import Callable, Iterator, Sequence

import sympy
import torch
import torch.fx

from graphopt.ir.dim_lowering import lower_dim
from graphopt.ir.graph import Graph, GraphError, Node, Value
from graphopt.ir.opdef import get_op
from graphopt.ir.ops.opaque import fill_template, resolve_target


class InterpreterError(GraphError):
    """The graph cannot be turned into an executable module (a dim not computable at run time), or one of its
    nodes fails when it runs (named)."""


def _size(x: torch.Tensor, axis: int) -> int:
    return x.shape[axis]


class _FxDims:
    """The ``lower_dim`` algebra of fx: python ints where both operands are known, else nodes
    computing the size from the graph inputs at run time."""

    def __init__(self, fx: torch.fx.Graph, placeholders: Sequence[tuple[Value, torch.fx.Node]]):
        self.fx, self.placeholders = fx, placeholders
        self.sizes: dict[sympy.Symbol, torch.fx.Node] = {}

    def const(self, value: int) -> int:
        return value

    def symbol(self, symbol: sympy.Symbol) -> torch.fx.Node | None:
        if symbol not in self.sizes:
            for v, ph in self.placeholders:
                for axis, d in enumerate(v.type.shape):
                    if d == symbol:
                        self.sizes[symbol] = self.fx.call_function(_size, (ph, axis))
                        return self.sizes[symbol]
        return self.sizes.get(symbol)

    def _call(self, fn, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return fn(a, b)
        return self.fx.call_function(fn, (a, b))

    def add(self, a, b):
        return self._call(operator.add, a, b)

    def mul(self, a, b):
        return self._call(operator.mul, a, b)

    def floordiv(self, a, b):
        return self._call(operator.floordiv, a, b)

    def max(self, a, b):
        return self._call(max, a, b)

    def min(self, a, b):
        return self._call(min, a, b)


def to_fx(graph: Graph, taps: Sequence[Value] = (),
          kernel_for: Callable[[Node], Callable | None] | None = None) -> torch.fx.GraphModule:
    """``taps``: extra values to return after the graph outputs (for calibration); ``kernel_for(node)``:
    a callable with the op's reference signature to run instead of the reference, or None."""
    root = torch.nn.Module()
    fx = torch.fx.Graph()
    env: dict[int, torch.fx.Node] = {}
    placeholders = []
    for i, v in enumerate(graph.inputs):
        node = fx.placeholder(_py_name(v.name, f"input_{i}"))
        env[id(v)] = node
        placeholders.append((v, node))
    for i, v in enumerate(graph.constants.values()):
        attr = f"c{i}"
        root.register_buffer(attr, v.const, persistent=False)  # the same tensor object: no copy
        env[id(v)] = fx.get_attr(attr)

    dims, memo = _FxDims(fx, placeholders), {}

    def materialize(value, node: Node):
        if isinstance(value, sympy.Expr):
            return lower_dim(value, dims, where=node.label(), memo=memo, error=InterpreterError)
        if isinstance(value, (list, tuple)):
            return type(value)(materialize(v, node) for v in value)
        if isinstance(value, dict):
            return {k: materialize(v, node) for k, v in value.items()}
        return value

    for node in graph.nodes:
        inputs = [env[id(v)] if v is not None else None for v in node.inputs]
        if node.op == "opaque":
            target = resolve_target(node.attrs["target"])
            call = fx.call_function(target, fill_template(materialize(node.attrs["args"], node), inputs),
                                    fill_template(materialize(node.attrs["kwargs"] or {}, node), inputs))
        else:
            target, attrs = _bind_unprintable((kernel_for and kernel_for(node)) or get_op(node.op).reference,
                                             materialize(node.attrs, node))
            call = fx.call_function(target, tuple(inputs), attrs)
        call.meta["ir_node"] = node.label()
        if len(node.outputs) == 1 and node.op != "opaque":
            env[id(node.outputs[0])] = call
        elif len(node.outputs) == 1 and not isinstance(node.attrs.get("out_types"), tuple):
            env[id(node.outputs[0])] = call
        else:
            multi = node.op != "opaque" or _returns_sequence(node)
            for i, out in enumerate(node.outputs):
                env[id(out)] = fx.call_function(operator.getitem, (call, i)) if multi else call
    fx.output(tuple(env[id(v)] for v in list(graph.outputs) + list(taps)))
    return torch.fx.GraphModule(root, fx, class_name=f"graphopt_{_py_name(graph.name, 'graph')}")


_PRINTABLE = (int, float, bool, str, bytes, type(None), torch.dtype, torch.fx.Node)


def _printable(value) -> bool:
    """Whether fx can write ``value`` into generated code (its repr is valid Python there)."""
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return all(_printable(v) for v in value)
    return isinstance(value, _PRINTABLE)


def _bind_unprintable(fn, attrs: dict):
    """Attributes fx cannot print (TensorTypes, plugin objects) are bound into a wrapper instead."""
    fixed = {k: v for k, v in attrs.items() if not _printable(v)}
    if not fixed:
        return fn, attrs

    def bound(*args, **kwargs):
        return fn(*args, **kwargs, **fixed)

    bound.__name__ = bound.__qualname__ = f"{getattr(fn, '__name__', 'op')}_bound"
    bound.__module__ = getattr(fn, "__module__", __name__)
    return bound, {k: v for k, v in attrs.items() if k not in fixed}


def _returns_sequence(node) -> bool:
    schema = resolve_target(node.attrs["target"])._schema
    return len(schema.returns) > 1 or str(schema.returns[0].type).startswith(("Tensor[]", "List"))


def _py_name(name: str, fallback: str) -> str:
    clean = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return clean if clean and not clean[0].isdigit() else fallback


def run(graph: Graph, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run the graph on flat input tensors (one per graph input), returning flat outputs."""
    with torch.no_grad():
        return to_fx(graph)(*tensors)


def collect(graph: Graph, batches: Sequence[Sequence[torch.Tensor]], values: Sequence[Value]) -> Iterator[dict[str, torch.Tensor]]:
    """Run the graph on each batch of flat inputs and yield ``{value name: tensor}`` for ``values``
    (intermediate activations, for calibration). The module is built once."""
    module = to_fx(graph, taps=values)
    n = len(graph.outputs)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            try:
                out = module(*batch)
            except Exception as e:
                where = failing_node(graph, batch)
                at = f"{where.label()} fails" if where is not None else "the graph fails"
                raise InterpreterError(f"{at} on batch {i}: {type(e).__name__}: {e}") from e
            yield {v.name: t for v, t in zip(values, out[n:])}


def failing_node(graph: Graph, inputs) -> Node | None:
    """The IR node whose computation raises when the graph runs on ``inputs``, or None."""
    failed = []

    class Finder(torch.fx.Interpreter):
        def run_node(self, n):
            try:
                return super().run_node(n)
            except Exception:
                failed.append(n.meta.get("ir_node"))
                raise

    try:
        with torch.no_grad():
            Finder(to_fx(graph)).run(*inputs)
    except Exception:
        pass
    label = failed[0] if failed else None
    return next((node for node in graph.nodes if node.label() == label), None)
