"""Reference backend: IR -> an executable ``torch.fx.GraphModule``.

Every node calls its op's reference implementation (opaque nodes call their ATen target), so
this backend is the semantics every other backend is compared against. Symbolic dims in
attributes (a reshape to ``[batch*197, 384]``) are computed at run time from the input sizes.
"""
from __future__ import annotations

import operator

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree

from typing import Iterator, Sequence

from graphopt.ir import Graph, Value, get_op
from graphopt.ir.ops.opaque import fill_template, resolve_target


class LoweringError(Exception):
    """The graph cannot be lowered to this backend."""


def _size(x: torch.Tensor, axis: int) -> int:
    return x.shape[axis]


def _floordiv(a, b):
    return a // b


def _ceildiv(a, b):
    return -(-a // b)


def to_fx(graph: Graph, taps: Sequence[Value] = ()) -> torch.fx.GraphModule:
    """``taps``: extra values to return after the graph outputs (for calibration)."""
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

    sizes: dict[sympy.Symbol, torch.fx.Node] = {}

    def bind(symbol: sympy.Symbol) -> torch.fx.Node:
        if symbol not in sizes:
            for v, ph in placeholders:
                for axis, d in enumerate(v.type.shape):
                    if d == symbol:
                        sizes[symbol] = fx.call_function(_size, (ph, axis))
                        return sizes[symbol]
            raise LoweringError(f"dim symbol {symbol} is not the size of any graph input axis, so it "
                                "cannot be computed at run time")
        return sizes[symbol]

    def emit(expr):
        """A sympy dim -> an int or an fx node computing it."""
        if isinstance(expr, (int, bool, float, str)) or expr is None:
            return expr
        if isinstance(expr, sympy.Integer):
            return int(expr)
        if isinstance(expr, sympy.Symbol):
            return bind(expr)
        if isinstance(expr, sympy.Add):
            return _fold(operator.add, [emit(a) for a in expr.args])
        if isinstance(expr, sympy.Mul):
            nums, dens = [], []
            for a in expr.args:
                if isinstance(a, sympy.Pow) and a.exp.is_Integer and a.exp < 0:
                    dens.append(emit(a.base ** -a.exp))
                elif isinstance(a, sympy.Rational) and not a.is_Integer:
                    nums.append(int(a.p))
                    dens.append(int(a.q))
                else:
                    nums.append(emit(a))
            num = _fold(operator.mul, nums)
            return _call(_floordiv, num, _fold(operator.mul, dens)) if dens else num
        if isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp > 0:
            return _fold(operator.mul, [emit(expr.base)] * int(expr.exp))
        if isinstance(expr, sympy.floor) and isinstance(expr.args[0], sympy.Mul):
            return emit(expr.args[0])  # integer-dividing Mul already floors
        if isinstance(expr, sympy.ceiling):
            num, den = sympy.fraction(sympy.together(expr.args[0]))
            return _call(_ceildiv, emit(num), emit(den))
        raise LoweringError(f"cannot compute dim expression {expr} at run time")

    def _call(fn, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return fn(a, b)
        return fx.call_function(fn, (a, b))

    def _fold(fn, items):
        result = items[0]
        for item in items[1:]:
            result = _call(fn, result, item)
        return result

    def materialize(value):
        if isinstance(value, sympy.Expr):
            return emit(value)
        if isinstance(value, (list, tuple)):
            return type(value)(materialize(v) for v in value)
        if isinstance(value, dict):
            return {k: materialize(v) for k, v in value.items()}
        return value

    for node in graph.nodes:
        inputs = [env[id(v)] if v is not None else None for v in node.inputs]
        if node.op == "opaque":
            target = resolve_target(node.attrs["target"])
            call = fx.call_function(target, fill_template(materialize(node.attrs["args"]), inputs),
                                    fill_template(materialize(node.attrs["kwargs"] or {}), inputs))
        else:
            target, attrs = _bind_unprintable(get_op(node.op).reference, materialize(node.attrs))
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


class TorchExecutable(torch.nn.Module):
    """Called like the captured model: same argument structure in, same output structure out."""

    def __init__(self, graph: Graph):
        super().__init__()
        self.graph_module = to_fx(graph)
        self._in_spec = graph.meta.get("in_spec")
        self._out_spec = graph.meta.get("out_spec")
        self._user_inputs = graph.meta.get("user_inputs")
        self._layout = graph.meta.get("output_layout")
        self._input_names = [v.name for v in graph.inputs]

    def run_flat(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.graph_module(*tensors)

    def forward(self, *args, **kwargs):
        if self._in_spec is None:
            return self.run_flat(*bind_by_name(self._input_names, args, kwargs))
        flat = flatten_inputs(self._in_spec, args, kwargs)
        tensors = [flat[i] for i, slot in enumerate(self._user_inputs) if slot is not None]
        outputs = self.run_flat(*tensors)
        leaves = [outputs[slot] if isinstance(slot, int) else slot[1] for slot in self._layout]
        return pytree.tree_unflatten(leaves, self._out_spec)


def bind_by_name(names: list[str], args, kwargs) -> list:
    """Inputs of a graph without a captured call structure (read from ONNX): positional in graph
    input order, or by input name."""
    if not kwargs:
        return list(args)
    if len(args) > len(names):
        raise TypeError(f"the graph takes {len(names)} inputs, got {len(args)} positional")
    values = dict(zip(names, args))
    for name, value in kwargs.items():
        if name not in names:
            raise TypeError(f"unexpected input {name!r}; the graph takes {', '.join(names)}")
        if name in values:
            raise TypeError(f"input {name!r} given twice")
        values[name] = value
    missing = [n for n in names if n not in values]
    if missing:
        raise TypeError(f"missing inputs: {', '.join(missing)}")
    return [values[n] for n in names]


def flatten_inputs(in_spec, args, kwargs) -> list:
    """Flatten (args, kwargs) the way the capture did, reordering kwargs to the captured order."""
    kwargs_spec = in_spec.child(1) if in_spec.num_children == 2 else None
    if kwargs_spec is not None and kwargs_spec.context:
        missing = [k for k in kwargs_spec.context if k not in kwargs]
        extra = [k for k in kwargs if k not in kwargs_spec.context]
        if missing or extra:
            raise TypeError(f"inputs differ from the captured ones: missing {missing}, unexpected {extra}")
        kwargs = {k: kwargs[k] for k in kwargs_spec.context}
    flat, spec = pytree.tree_flatten((tuple(args), kwargs))
    if spec != in_spec:
        raise TypeError(f"input structure differs from the captured one:\n  captured {in_spec}\n  got      {spec}")
    return flat


def run(graph: Graph, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run the graph on flat input tensors (one per graph input), returning flat outputs."""
    with torch.no_grad():
        return TorchExecutable(graph).run_flat(*tensors)


def collect(graph: Graph, batches: Sequence[Sequence[torch.Tensor]], values: Sequence[Value]) -> Iterator[dict[str, torch.Tensor]]:
    """Run the graph on each batch of flat inputs and yield ``{value name: tensor}`` for ``values``
    (intermediate activations, for calibration). The module is built once."""
    module = to_fx(graph, taps=values)
    n = len(graph.outputs)
    with torch.no_grad():
        for batch in batches:
            out = module(*batch)
            yield {v.name: t for v, t in zip(values, out[n:])}
