"""IR -> ONNX ``ModelProto``.

Every IR op lowers to standard ai.onnx ops (``register_lowering`` adds lowerings for ops that later
passes define, e.g. integer or token-merging ops, as compositions of standard ops, so any ONNX
Runtime build runs them without a custom-op library). ``onnx_opaque`` nodes are written back
verbatim with the opset imports they need (``com.microsoft`` and so on). ATen ``opaque`` nodes
lower only where a lowering for their target exists; otherwise the error names the target and node.

Symbolic dims stay symbolic: a reshape to ``[batch*197, 384]`` becomes ``Reshape(x, [-1, 384])``
and a dim that cannot be expressed that way is computed from the graph inputs' shapes at run time
(``Shape`` / ``Gather`` / ``Mul`` ...). Names and order are stable, so the same graph always
serializes to the same bytes.
"""
from __future__ import annotations

import copy
import math
import re
from typing import Callable, Sequence

import numpy as np
import onnx
import sympy
import torch
from onnx import TensorProto, helper

from graphopt.backends import LoweringError
from graphopt.ir import Graph, Node, Value
from graphopt.ir.onnx_common import INT64_MAX, dim_to_param, onnx_dtype, tensor_to_proto
from graphopt.ir.ops.onnx_opaque import OP as ONNX_OPAQUE
from graphopt.ir.ops.opaque import TensorArg
from graphopt.ir.ops.rules import result_dtype
from graphopt.ir.ops.shape import BIG
from graphopt.ir.types import dims_equal, format_dim

DEFAULT_OPSET = 20
MIN_OPSET = 13
MAX_RUNTIME_IR_VERSION = 10  # keep emitted files loadable by older onnxruntime builds where the opset allows

LOWERINGS: dict[str, Callable] = {}
ATEN_LOWERINGS: dict[str, Callable] = {}


def register_lowering(op: str, *, replace: bool = False):
    """Register ``fn(em, node) -> list[str]`` writing IR op ``op`` as standard ONNX ops.

    ``em.input(node, i, dtype)`` gives the ONNX name of input i (cast when asked), ``em.out(node, i)``
    the name to give output i, ``em.node(op_type, inputs, outputs, **attrs)`` appends an ONNX node,
    ``em.literal(values, dtype)`` a small constant, ``em.dims(shape)`` a 1-D int64 tensor of
    (possibly symbolic) dims and ``em.opset`` the ai.onnx opset being written."""
    def wrap(fn):
        if op in LOWERINGS and not replace:
            raise ValueError(f"an ONNX lowering for op {op!r} is already registered; pass replace=True")
        LOWERINGS[op] = fn
        return fn
    return wrap


def register_aten_lowering(target: str):
    """Lowering for an ATen ``opaque`` node with this target (``aten::index.Tensor``)."""
    def wrap(fn):
        ATEN_LOWERINGS[target] = fn
        return fn
    return wrap


def to_onnx(graph: Graph, *, opset: int | None = None, value_info: bool = False) -> onnx.ModelProto:
    """The graph as an ONNX model (deterministic: same graph, same bytes).

    ``value_info=True`` also declares the type of every intermediate value (for viewers and tools).
    It is off by default: measured on DeiT-S and MiniLM, onnxruntime runs the same graph 6-8% slower
    when intermediate shapes are declared than when it infers them itself."""
    load_lowerings()
    return _Emitter(graph, opset).build(value_info)


_LOADED = False


def load_lowerings() -> None:
    """Import the lowerings that live beside this module (``graphopt/backends/onnx_*.py``: integer
    ops, token ops, ...) and those of installed packages declaring a ``graphopt.onnx_lowerings``
    entry point. Runs once."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import importlib.metadata
    import pkgutil

    import graphopt.backends as backends

    for info in sorted(pkgutil.iter_modules(backends.__path__), key=lambda m: m.name):
        if info.name.startswith("onnx_") and info.name != "onnx_lowering":
            try:
                importlib.import_module(f"graphopt.backends.{info.name}")
            except ModuleNotFoundError as e:  # an optional dependency of that lowering is missing
                if e.name and e.name.startswith("graphopt"):
                    raise
    for entry in importlib.metadata.entry_points(group="graphopt.onnx_lowerings"):
        entry.load()


class _Emitter:
    def __init__(self, graph: Graph, opset: int | None):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.used: set[str] = set()
        self.names: dict[int, str] = {}
        self.cache: dict[tuple, str] = {}
        self.functions: dict[tuple, onnx.FunctionProto] = {}
        self.current: Node | None = None
        self.counter = 0
        self.opsets = self._opsets(opset)
        self.opset = self.opsets[""]
        self.dim_params: dict[str, str] = dict(graph.meta.get("onnx_dim_params") or {})
        self.anonymous = set(graph.meta.get("onnx_anonymous_dims") or ())
        self.sources: dict[sympy.Symbol, tuple[str, int]] = {}
        self.reserved: dict[int, str] = {}
        self._node_names: set[str] = set()

    # ---- opsets ----------------------------------------------------------------------------
    def _opsets(self, requested: int | None) -> dict[str, int]:
        binding: dict[str, tuple[int, str]] = {}
        companion: dict[str, int] = {}
        for node in self.graph.nodes:
            if node.op != ONNX_OPAQUE:
                continue
            own = node.attrs["domain"]
            for domain, version in node.attrs["opsets"]:
                if domain == own:
                    if domain in binding and binding[domain][0] != version:
                        raise LoweringError(f"node {node.label()} needs {domain or 'ai.onnx'} opset {version} but "
                                            f"{binding[domain][1]} needs {binding[domain][0]}; one ONNX model has one "
                                            "version per domain")
                    binding[domain] = (version, node.label())
                else:
                    companion.setdefault(domain, version)
        meta = dict(self.graph.meta.get("onnx_opsets") or {})
        opsets = {**meta, **companion, **{d: v for d, (v, _) in binding.items()}}
        if requested is not None:
            if "" in binding and binding[""][0] != requested:
                raise LoweringError(f"opset {requested} was asked for, but {binding[''][1]} is an ai.onnx op kept "
                                    f"as read at opset {binding[''][0]}")
            opsets[""] = requested
        opsets.setdefault("", DEFAULT_OPSET)
        if opsets[""] < MIN_OPSET:
            raise LoweringError(f"ai.onnx opset {opsets['']} is below the lowest one written ({MIN_OPSET})")
        return opsets

    # ---- names -----------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        base = base or "v"
        if base not in self.used:
            self.used.add(base)
            return base
        k = 1
        while f"{base}_{k}" in self.used:
            k += 1
        self.used.add(f"{base}_{k}")
        return f"{base}_{k}"

    def out(self, node: Node, i: int = 0) -> str:
        """The ONNX name for IR output i of ``node``."""
        value = node.outputs[i]
        if id(value) not in self.names:
            self.names[id(value)] = self.reserved.get(id(value)) or self.fresh(value.name)
        return self.names[id(value)]

    def tmp(self, hint: str = "t") -> str:
        base = self.current.outputs[0].name if self.current is not None and self.current.outputs else "t"
        return self.fresh(f"{base}/{hint}")

    # ---- building blocks --------------------------------------------------------------------
    def node(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str] | str | None = None, *,
             domain: str = "", name: str | None = None, **attrs) -> list[str]:
        if outputs is None:
            outputs = [self.tmp(op_type)]
        elif isinstance(outputs, str):
            outputs = [outputs]
        self.counter += 1
        label = name or f"{op_type}_{self.counter}"
        n = helper.make_node(op_type, list(inputs), list(outputs), name=self.fresh_node_name(label),
                             domain=domain or None, **{k: v for k, v in attrs.items() if v is not None})
        self.nodes.append(n)
        return list(outputs)

    def one(self, op_type: str, inputs: Sequence[str], output: str | None = None, **attrs) -> str:
        return self.node(op_type, inputs, None if output is None else [output], **attrs)[0]

    def fresh_node_name(self, label: str) -> str:
        name, k = label, 1
        while name in self._node_names:
            name = f"{label}_{k}"
            k += 1
        self._node_names.add(name)
        return name

    def literal(self, values, dtype: torch.dtype = torch.int64, shape: Sequence[int] | None = None) -> str:
        tensor = torch.tensor(values, dtype=dtype)
        if shape is not None:
            tensor = tensor.reshape(tuple(shape))
        key = ("literal", dtype, tuple(tensor.shape), tensor.numpy().tobytes() if dtype is not torch.bfloat16 else
               tensor.view(torch.int16).numpy().tobytes())
        if key not in self.cache:
            name = self.fresh("const")
            self.initializers.append(tensor_to_proto(tensor, name))
            self.cache[key] = name
        return self.cache[key]

    def constant(self, value: Value, dtype: torch.dtype | None = None, transform: str | None = None) -> str:
        """The initializer for an IR constant, optionally cast or transposed (computed once)."""
        key = ("const", id(value), dtype, transform)
        if key not in self.cache:
            tensor = value.const
            if transform == "T":
                tensor = tensor.t()
            if dtype is not None and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            if dtype is None and transform is None:
                name = self.fresh(value.name)
            else:
                suffix = "_T" if transform else ""
                name = self.fresh(f"{value.name}{suffix}" + (f"_{str(dtype).split('.')[-1]}" if dtype is not None
                                                             and dtype != value.const.dtype else ""))
            self.initializers.append(tensor_to_proto(tensor, name))
            self.cache[key] = name
            if dtype is None and transform is None:
                self.names[id(value)] = name
        return self.cache[key]

    def value(self, value: Value | None, dtype: torch.dtype | None = None) -> str:
        """The ONNX name of an IR value, cast to ``dtype`` when it differs (constants cast once, here)."""
        if value is None:
            return ""
        if dtype is not None and dtype == value.type.dtype:
            dtype = None
        if value.is_constant:
            return self.constant(value, dtype)
        name = self.names.get(id(value))
        if name is None:
            raise LoweringError(f"value %{value.name} is used before it is defined")
        if dtype is None:
            return name
        key = ("cast", name, dtype)
        if key not in self.cache:
            self.cache[key] = self.one("Cast", [name], self.fresh(f"{name}_{str(dtype).split('.')[-1]}"),
                                       to=onnx_dtype(dtype))
        return self.cache[key]

    def input(self, node: Node, i: int, dtype: torch.dtype | None = None) -> str:
        return self.value(node.inputs[i] if i < len(node.inputs) else None, dtype)

    # ---- symbolic dims -----------------------------------------------------------------------
    def dim1(self, expr) -> str:
        """A 1-D int64 tensor [expr], computed from the graph inputs' shapes when symbolic."""
        if isinstance(expr, (int, np.integer)) or (isinstance(expr, sympy.Expr) and expr.is_Integer):
            return self.literal([int(expr)])
        key = ("dim", expr)
        if key in self.cache:
            return self.cache[key]
        if isinstance(expr, sympy.Symbol):
            if expr not in self.sources:
                raise LoweringError(f"dim {expr} (node {self._where()}) is not the size of any graph input axis, "
                                    "so it cannot be computed at run time")
            name, axis = self.sources[expr]
            if self.opset >= 15:
                result = self.one("Shape", [name], self.fresh(f"{expr}_dim"), start=axis, end=axis + 1)
            else:
                shape = self.one("Shape", [name])
                result = self.one("Gather", [shape, self.literal([axis])], self.fresh(f"{expr}_dim"), axis=0)
        elif isinstance(expr, sympy.Add):
            result = self._fold("Add", [self.dim1(a) for a in _ordered_args(expr)])
        elif isinstance(expr, sympy.Mul):
            nums, dens = [], []
            for a in _ordered_args(expr):
                if isinstance(a, sympy.Rational) and not a.is_Integer:
                    nums.append(self.literal([int(a.p)]))
                    dens.append(int(a.q))
                elif isinstance(a, sympy.Pow) and a.exp.is_Integer and a.exp < 0:
                    dens.append(a.base ** -a.exp)
                else:
                    nums.append(self.dim1(a))
            result = self._fold("Mul", nums)
            if dens:
                den = self.dim1(sympy.Mul(*dens)) if any(not isinstance(d, int) for d in dens) else self.literal(
                    [math.prod(int(d) for d in dens)])
                result = self.one("Div", [result, den])
        elif isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp > 0:
            result = self._fold("Mul", [self.dim1(expr.base)] * int(expr.exp))
        elif isinstance(expr, sympy.floor):
            num, den = sympy.fraction(sympy.together(expr.args[0]))
            result = self.one("Div", [self.dim1(num), self.dim1(den)]) if den != 1 else self.dim1(num)
        elif isinstance(expr, sympy.ceiling):
            num, den = sympy.fraction(sympy.together(expr.args[0]))
            result = self.one("Div", [self.dim1(num + den - 1), self.dim1(den)])
        elif isinstance(expr, (sympy.Max, sympy.Min)):
            result = self._fold("Max" if isinstance(expr, sympy.Max) else "Min", [self.dim1(a) for a in _ordered_args(expr)])
        else:
            raise LoweringError(f"cannot compute dim {expr} at run time (node {self._where()})")
        self.cache[key] = result
        return result

    def _fold(self, op, items):
        result = items[0]
        for item in items[1:]:
            result = self.one(op, [result, item])
        return result

    def dims(self, shape: Sequence) -> str:
        """A 1-D int64 tensor holding ``shape`` (literal where static)."""
        shape = list(shape)
        if all(isinstance(d, int) for d in shape):
            return self.literal(shape, shape=[len(shape)])
        pieces, run = [], []
        for d in shape:
            if isinstance(d, int):
                run.append(d)
                continue
            if run:
                pieces.append(self.literal(run))
                run = []
            pieces.append(self.dim1(d))
        if run:
            pieces.append(self.literal(run))
        return pieces[0] if len(pieces) == 1 else self.one("Concat", pieces, axis=0)

    def scalar(self, expr, dtype: torch.dtype = torch.int64) -> str:
        """A 0-D tensor holding a (possibly symbolic) dim."""
        if isinstance(expr, int) or (isinstance(expr, sympy.Expr) and expr.is_Integer):
            return self.literal(int(expr), dtype)
        result = self.one("Squeeze", [self.dim1(expr), self.literal([0])])
        return result if dtype == torch.int64 else self.one("Cast", [result], to=onnx_dtype(dtype))

    def _where(self) -> str:
        return self.current.label() if self.current is not None else "graph"

    # ---- the model ---------------------------------------------------------------------------
    def build(self, with_value_info: bool = False) -> onnx.ModelProto:
        g = self.graph
        for v in g.inputs:
            if v.name in self.used:
                raise LoweringError(f"graph input name {v.name!r} is used twice")
            self.used.add(v.name)
            self.names[id(v)] = v.name
            for axis, d in enumerate(v.type.shape):
                if isinstance(d, sympy.Symbol) and d not in self.sources:
                    self.sources[d] = (v.name, axis)
        out_names = _output_names(g)
        needs_identity: list[int] = []
        for i, (v, name) in enumerate(zip(g.outputs, out_names)):
            name = self.fresh(name)
            out_names[i] = name
            if v.producer is None or id(v) in self.reserved:
                needs_identity.append(i)
            else:
                self.reserved[id(v)] = name

        for node in g.nodes:
            self.current = node
            results = self._lower(node)
            for value, name in zip(node.outputs, results):
                if id(value) in self.reserved and name != self.reserved[id(value)]:
                    self.one("Identity", [name], self.reserved[id(value)])
                    name = self.reserved[id(value)]
                self.names[id(value)] = name
        self.current = None
        for i in needs_identity:
            self.one("Identity", [self.value(g.outputs[i])], out_names[i])

        inputs = [self._value_info(v.name, v.type, interface=True) for v in g.inputs]
        outputs = [self._value_info(name, v.type, interface=True) for v, name in zip(g.outputs, out_names)]
        value_info = []
        if with_value_info:  # the IR knows every intermediate type, symbolic dims included
            declared = {vi.name for vi in inputs + outputs} | {t.name for t in self.initializers}
            for node in g.nodes:
                for v in node.outputs:
                    name = self.names.get(id(v))
                    if name is not None and name not in declared:
                        declared.add(name)
                        value_info.append(self._value_info(name, v.type))
        info = g.meta.get("onnx_model_info") or {}
        graph_proto = helper.make_graph(self.nodes, g.name or "main", inputs, outputs, self.initializers,
                                        doc_string=info.get("graph_doc_string") or None, value_info=value_info)
        opset_ids = [helper.make_opsetid(d, v) for d, v in sorted(self.opsets.items())]
        required = helper.find_min_ir_version_for(opset_ids, ignore_unknown=True)
        source = int(g.meta.get("onnx_ir_version") or 0)
        ir_version = max(required, min(source, MAX_RUNTIME_IR_VERSION) if source else required)
        model = helper.make_model(graph_proto, opset_imports=opset_ids, ir_version=ir_version,
                                  producer_name="graphopt", producer_version=_version())
        if info.get("domain"):
            model.domain = info["domain"]
        if info.get("model_version"):
            model.model_version = info["model_version"]
        if info.get("doc_string"):
            model.doc_string = info["doc_string"]
        for key, value in info.get("metadata_props") or []:
            model.metadata_props.add(key=key, value=value)
        model.functions.extend(self.functions[k] for k in self.functions)
        return model

    def _value_info(self, name: str, t, interface: bool = False) -> onnx.ValueInfoProto:
        """A typed name. Symbolic dims become dim_params only when they are graph input dims (or
        expressions of them): onnxruntime takes one dim_param for one size everywhere, so a dim the IR
        cannot tie to the inputs is left unnamed. Graph inputs and outputs keep every name they have."""
        vi = helper.make_tensor_value_info(name, onnx_dtype(t.dtype), None)
        shape = vi.type.tensor_type.shape
        shape.SetInParent()
        for d in t.shape:
            dim = shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif isinstance(d, sympy.Symbol) and d.name in self.anonymous:
                continue
            elif interface or d.free_symbols <= set(self.sources):
                dim.dim_param = dim_to_param(d, self.dim_params)
        return vi

    def _lower(self, node: Node) -> list[str]:
        if node.op == "opaque":
            target = node.attrs["target"]
            fn = ATEN_LOWERINGS.get(target)
            if fn is None:
                raise LoweringError(f"no ONNX lowering for {target} (node %{node.outputs[0].name if node.outputs else '?'}); "
                                    "register one with graphopt.backends.onnx_lowering.register_aten_lowering")
        else:
            fn = LOWERINGS.get(node.op)
            if fn is None:
                raise LoweringError(f"no ONNX lowering for IR op {node.op!r} (node {node.label()}); register one with "
                                    "graphopt.backends.onnx_lowering.register_lowering")
        try:
            results = fn(self, node)
        except LoweringError:
            raise
        except Exception as e:  # a lowering bug or an unsupported corner: name the node
            raise LoweringError(f"cannot lower node {node.label()} to ONNX: {type(e).__name__}: {e}") from e
        results = [results] if isinstance(results, str) else list(results)
        if len(results) != len(node.outputs):
            raise LoweringError(f"the ONNX lowering of {node.op} gave {len(results)} outputs for {len(node.outputs)}")
        return results


def _ordered_args(expr):
    return sorted(expr.args, key=sympy.default_sort_key)


def _version() -> str:
    try:
        from graphopt import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "0"


def _output_names(graph: Graph) -> list[str]:
    n = len(graph.outputs)
    names = graph.meta.get("onnx_output_names")
    if names and len(names) == n and len(set(names)) == n:
        return list(names)
    names = [None] * n
    spec, layout = graph.meta.get("out_spec"), graph.meta.get("output_layout")
    if spec is not None and layout is not None:
        try:
            import torch.utils._pytree as pytree

            tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
            for path, leaf in pytree.tree_flatten_with_path(tree)[0]:
                slot = layout[leaf]
                if isinstance(slot, int):
                    names[slot] = _path_name(path, n)
        except Exception:  # output names are cosmetic; fall back to output_i
            pass
    out, seen = [], set()
    for i, name in enumerate(names):
        name = name or ("output" if n == 1 else f"output_{i}")
        while name in seen:
            name += "_"
        seen.add(name)
        out.append(name)
    return out


def _path_name(path, n) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    if not parts or all(p.isdigit() for p in parts):
        return "output" if n == 1 and not parts else "output_" + "_".join(parts)
    return re.sub(r"\W", "_", "_".join(parts))


# =============================================================================================
# Lowerings of the built-in IR ops
# =============================================================================================
def _out_dtype(node: Node, i: int = 0) -> torch.dtype:
    return node.outputs[i].type.dtype


def _simple(op_type: str, cast_inputs: bool = True):
    def lower(em: _Emitter, node: Node):
        dtype = _out_dtype(node) if cast_inputs else None
        return em.one(op_type, [em.input(node, i, dtype) for i in range(len(node.inputs))], em.out(node))
    return lower


for _ir, _onnx in [("sub", "Sub"), ("maximum", "Max"), ("minimum", "Min"), ("matmul", "MatMul")]:
    LOWERINGS[_ir] = _simple(_onnx)


@register_lowering("add")
def _add(em, node):
    op = "Or" if _out_dtype(node) is torch.bool else "Add"
    return em.one(op, [em.input(node, 0, _out_dtype(node)), em.input(node, 1, _out_dtype(node))], em.out(node))


@register_lowering("mul")
def _mul(em, node):
    op = "And" if _out_dtype(node) is torch.bool else "Mul"
    return em.one(op, [em.input(node, 0, _out_dtype(node)), em.input(node, 1, _out_dtype(node))], em.out(node))


def _trunc(em, x, out, dtype):
    negative = em.one("Less", [x, em.literal(0.0, dtype)])
    return em.one("Where", [negative, em.one("Ceil", [x]), em.one("Floor", [x])], out)


@register_lowering("div")
def _div(em, node):
    dtype, mode = _out_dtype(node), node.attrs["rounding_mode"]
    a, b = em.input(node, 0, dtype), em.input(node, 1, dtype)
    if mode == "none" or (mode == "trunc" and not dtype.is_floating_point):
        return em.one("Div", [a, b], em.out(node))
    if mode == "floor" and not dtype.is_floating_point:
        remainder = em.one("Mod", [a, b], fmod=0)
        return em.one("Div", [em.one("Sub", [a, remainder]), b], em.out(node))
    quotient = em.one("Div", [a, b])
    if mode == "floor":
        return em.one("Floor", [quotient], em.out(node))
    return _trunc(em, quotient, em.out(node), dtype)


@register_lowering("pow")
def _pow(em, node):
    dtype = _out_dtype(node)
    return em.one("Pow", [em.input(node, 0, dtype), em.input(node, 1, dtype)], em.out(node))


@register_lowering("where")
def _where(em, node):
    dtype = _out_dtype(node)
    return em.one("Where", [em.input(node, 0, torch.bool), em.input(node, 1, dtype), em.input(node, 2, dtype)],
                  em.out(node))


def _compare(op_type, negate=False):
    def lower(em, node):
        common = result_dtype(node.inputs[0].type, node.inputs[1].type)
        a, b = em.input(node, 0, common), em.input(node, 1, common)
        if negate:
            return em.one("Not", [em.one(op_type, [a, b])], em.out(node))
        return em.one(op_type, [a, b], em.out(node))
    return lower


for _ir, _onnx in [("eq", "Equal"), ("lt", "Less"), ("le", "LessOrEqual"), ("gt", "Greater"),
                   ("ge", "GreaterOrEqual")]:
    LOWERINGS[_ir] = _compare(_onnx)
LOWERINGS["ne"] = _compare("Equal", negate=True)


def _logical(op_type):
    def lower(em, node):
        return em.one(op_type, [em.input(node, i, torch.bool) for i in range(len(node.inputs))], em.out(node))
    return lower


LOWERINGS["logical_and"] = _logical("And")
LOWERINGS["logical_or"] = _logical("Or")
LOWERINGS["logical_not"] = _logical("Not")

for _ir, _onnx in [("neg", "Neg"), ("abs", "Abs"), ("sign", "Sign"), ("tanh", "Tanh"), ("sigmoid", "Sigmoid"),
                   ("exp", "Exp"), ("log", "Log"), ("sqrt", "Sqrt"), ("erf", "Erf"), ("sin", "Sin"), ("cos", "Cos"),
                   ("reciprocal", "Reciprocal")]:
    LOWERINGS[_ir] = _simple(_onnx)


@register_lowering("relu")
def _relu(em, node):
    x = em.input(node, 0)
    if not _out_dtype(node).is_floating_point:  # onnxruntime has no integer Relu kernels
        return em.one("Max", [x, em.literal(0, _out_dtype(node))], em.out(node))
    return em.one("Relu", [x], em.out(node))


def _float_only(op_type):
    def lower(em, node):
        if not _out_dtype(node).is_floating_point:
            return em.input(node, 0)  # floor/round of an integer is the integer
        return em.one(op_type, [em.input(node, 0)], em.out(node))
    return lower


LOWERINGS["floor"] = _float_only("Floor")
LOWERINGS["round"] = _float_only("Round")


@register_lowering("rsqrt")
def _rsqrt(em, node):
    return em.one("Reciprocal", [em.one("Sqrt", [em.input(node, 0, _out_dtype(node))])], em.out(node))


@register_lowering("silu")
def _silu(em, node):
    x = em.input(node, 0, _out_dtype(node))
    return em.one("Mul", [x, em.one("Sigmoid", [x])], em.out(node))


def emit_gelu(em, x: str, dtype, approximate: str, output: str | None = None) -> str:
    """GELU as ONNX: the Gelu op from opset 20, else its erf or tanh formula."""
    if em.opset >= 20:
        return em.one("Gelu", [x], output, approximate=approximate)
    half, one = em.literal(0.5, dtype), em.literal(1.0, dtype)
    if approximate == "tanh":
        cube = em.one("Mul", [em.one("Mul", [x, x]), x])
        inner = em.one("Add", [x, em.one("Mul", [cube, em.literal(0.044715, dtype)])])
        t = em.one("Tanh", [em.one("Mul", [inner, em.literal(math.sqrt(2 / math.pi), dtype)])])
    else:
        t = em.one("Erf", [em.one("Mul", [x, em.literal(1 / math.sqrt(2), dtype)])])
    return em.one("Mul", [em.one("Mul", [x, half]), em.one("Add", [t, one])], output)


@register_lowering("gelu")
def _gelu(em, node):
    dtype = _out_dtype(node)
    return emit_gelu(em, em.input(node, 0, dtype), dtype, node.attrs["approximate"], em.out(node))


@register_lowering("clamp")
def _clamp(em, node):
    dtype = _out_dtype(node)
    lo, hi = node.attrs["min"], node.attrs["max"]
    return em.one("Clip", [em.input(node, 0, dtype), em.literal(lo, dtype) if lo is not None else "",
                           em.literal(hi, dtype) if hi is not None else ""], em.out(node))


@register_lowering("cast")
def _cast(em, node):
    if node.inputs[0].type.dtype == node.attrs["dtype"]:
        return em.input(node, 0)
    return em.one("Cast", [em.input(node, 0)], em.out(node), to=onnx_dtype(node.attrs["dtype"]))


@register_lowering("linear")
def _linear(em, node):
    dtype = _out_dtype(node)
    x, w = node.inputs[0], node.inputs[1]
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    if x.type.rank == 2 and dtype.is_floating_point:
        inputs = [em.input(node, 0, dtype), em.input(node, 1, dtype)] + ([em.input(node, 2, dtype)] if has_bias else [])
        return em.one("Gemm", inputs, em.out(node), transB=1)
    if w.is_constant:
        wt = em.constant(w, dtype if w.type.dtype != dtype else None, transform="T")
    else:
        wt = em.one("Transpose", [em.input(node, 1, dtype)], perm=[1, 0])
    if not has_bias:
        return em.one("MatMul", [em.input(node, 0, dtype), wt], em.out(node))
    y = em.one("MatMul", [em.input(node, 0, dtype), wt])
    return em.one("Add", [y, em.input(node, 2, dtype)], em.out(node))


@register_lowering("conv2d")
def _conv2d(em, node):
    dtype = _out_dtype(node)
    a = node.attrs
    w = node.inputs[1]
    inputs = [em.input(node, 0, dtype), em.input(node, 1, dtype)]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        inputs.append(em.input(node, 2, dtype))
    kernel = list(w.type.shape[2:]) if all(isinstance(d, int) for d in w.type.shape[2:]) else None
    return em.one("Conv", inputs, em.out(node), strides=list(a["stride"]), dilations=list(a["dilation"]),
                  pads=[a["padding"][0], a["padding"][1], a["padding"][0], a["padding"][1]], group=a["groups"],
                  kernel_shape=kernel)


def _reduce_mean(em, x, axes, keepdims, out=None):
    if em.opset >= 18:
        return em.one("ReduceMean", [x, em.literal(axes)], out, keepdims=keepdims)
    return em.one("ReduceMean", [x], out, axes=axes, keepdims=keepdims)


@register_lowering("layer_norm")
def _layer_norm(em, node):
    dtype = _out_dtype(node)
    x = node.inputs[0]
    shape = node.attrs["normalized_shape"]
    eps = node.attrs["eps"]
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    n = len(shape)
    if em.opset >= 17:
        if weight is not None:
            scale = em.value(weight, dtype)
        elif all(isinstance(d, int) for d in shape):
            scale = em.literal(np.ones(shape).tolist(), dtype, shape=shape)
        else:
            one = helper.make_tensor("value", onnx_dtype(dtype), [1], [1])
            scale = em.one("ConstantOfShape", [em.dims(shape)], value=one)
        inputs = [em.value(x, dtype), scale] + ([em.value(bias, dtype)] if bias is not None else [])
        return em.node("LayerNormalization", inputs, [em.out(node)], axis=-n, epsilon=eps)[0]
    xv = em.value(x, dtype)
    axes = list(range(-n, 0))
    centered = em.one("Sub", [xv, _reduce_mean(em, xv, axes, 1)])
    var = _reduce_mean(em, em.one("Mul", [centered, centered]), axes, 1)
    y = em.one("Div", [centered, em.one("Sqrt", [em.one("Add", [var, em.literal(eps, dtype)])])])
    if weight is not None:
        y = em.one("Mul", [y, em.value(weight, dtype)])
    if bias is not None:
        y = em.one("Add", [y, em.value(bias, dtype)])
    return em.one("Identity", [y], em.out(node))


@register_lowering("softmax")
def _softmax(em, node):
    return em.one("Softmax", [em.input(node, 0, _out_dtype(node))], em.out(node), axis=node.attrs["dim"])


@register_lowering("sdpa")
def _sdpa(em, node):
    dtype = _out_dtype(node)
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    scale = node.attrs["scale"]
    if scale is None:
        head = q.type.shape[-1]
        if not isinstance(head, int):
            raise LoweringError(f"sdpa with a symbolic head size {head} needs an explicit scale")
        scale = 1.0 / math.sqrt(head)
    rank = k.type.rank
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    kt = em.one("Transpose", [em.value(k, dtype)], perm=perm)
    scores = em.one("Mul", [em.one("MatMul", [em.value(q, dtype), kt]), em.literal(scale, dtype)])
    neg_inf = em.literal(float("-inf"), dtype)
    if node.attrs["is_causal"]:
        L, S = q.type.shape[-2], k.type.shape[-2]
        if isinstance(L, int) and isinstance(S, int):
            keep = em.literal(torch.ones(L, S, dtype=torch.bool).tril().tolist(), torch.bool, shape=[L, S])
        else:  # key position <= query position, from two ranges (no Trilu: it needs opset 14)
            zero, step = em.literal(0), em.literal(1)
            rows = em.one("Unsqueeze", [em.one("Range", [zero, em.scalar(L), step]), em.literal([1])])
            cols = em.one("Unsqueeze", [em.one("Range", [zero, em.scalar(S), step]), em.literal([0])])
            keep = em.one("LessOrEqual", [cols, rows])
        scores = em.one("Where", [keep, scores, neg_inf])
    if mask is not None:
        if mask.type.dtype is torch.bool:
            # one Where per distinct mask makes it additive (0 / -inf); every layer then pays a broadcast
            # Add instead of a Where over all its heads' scores (ONNX Runtime's Where is ~10x slower per element)
            key = ("additive_mask", id(mask), dtype)
            if key not in em.cache:
                em.cache[key] = em.one("Where", [em.value(mask), em.literal(0.0, dtype), neg_inf])
            scores = em.one("Add", [scores, em.cache[key]])
        else:
            scores = em.one("Add", [scores, em.value(mask, dtype)])
    probs = em.one("Softmax", [scores], axis=-1)
    return em.one("MatMul", [probs, em.value(v, dtype)], em.out(node))


@register_lowering("embedding")
def _embedding(em, node):
    return em.one("Gather", [em.input(node, 0), em.input(node, 1)], em.out(node), axis=0)


def _reduce(op_type):
    def lower(em, node):
        dtype = _out_dtype(node)
        x = em.input(node, 0, dtype)
        dims = list(node.attrs["dims"])
        keep = int(node.attrs["keepdim"])
        axes_as_input = op_type == "ReduceSum" or em.opset >= 18
        if not dims:
            return em.one(op_type, [x], em.out(node), keepdims=keep)
        if axes_as_input:
            return em.one(op_type, [x, em.literal(dims)], em.out(node), keepdims=keep)
        return em.one(op_type, [x], em.out(node), axes=dims, keepdims=keep)
    return lower


LOWERINGS["mean"] = _reduce("ReduceMean")
LOWERINGS["sum"] = _reduce("ReduceSum")
LOWERINGS["amax"] = _reduce("ReduceMax")


@register_lowering("reshape")
def _reshape(em, node):
    x = node.inputs[0]
    target = list(node.attrs["shape"])
    source = list(x.type.shape)
    if any(isinstance(d, int) and d == 0 for d in target):
        return em.one("Reshape", [em.input(node, 0), em.dims(target)], em.out(node), allowzero=1)
    spec: list = []
    for i, d in enumerate(target):
        if isinstance(d, int):
            spec.append(d)
        elif i < len(source) and dims_equal(source[i], d):
            spec.append(0)
        else:
            spec.append(d)
    symbolic = [i for i, d in enumerate(spec) if not isinstance(d, int)]
    if len(symbolic) == 1 and -1 not in spec:
        spec[symbolic[0]] = -1
    return em.one("Reshape", [em.input(node, 0), em.dims(spec)], em.out(node))


@register_lowering("permute")
def _permute(em, node):
    return em.one("Transpose", [em.input(node, 0)], em.out(node), perm=list(node.attrs["dims"]))


@register_lowering("expand")
def _expand(em, node):
    x = node.inputs[0]
    target = list(node.attrs["shape"])
    lead = len(target) - x.type.rank
    spec = []
    for i, d in enumerate(target):
        src = x.type.shape[i - lead] if i >= lead else None
        if isinstance(d, int) and d == -1:
            spec.append(1)
        elif src is not None and not isinstance(d, int) and dims_equal(src, d):
            spec.append(1)
        else:
            spec.append(d)
    return em.one("Expand", [em.input(node, 0), em.dims(spec)], em.out(node))


@register_lowering("cat")
def _cat(em, node):
    dtype = _out_dtype(node)
    return em.one("Concat", [em.input(node, i, dtype) for i in range(len(node.inputs))], em.out(node),
                  axis=node.attrs["dim"])


def _bound(em, d):
    if isinstance(d, int):
        return em.literal([min(d, INT64_MAX) if d < BIG else INT64_MAX])
    return em.dim1(d)


@register_lowering("slice")
def _slice(em, node):
    a = node.attrs
    return em.one("Slice", [em.input(node, 0), _bound(em, a["start"]), _bound(em, a["end"]),
                            em.literal([a["dim"]]), em.literal([a["step"]])], em.out(node))


@register_lowering("select")
def _select(em, node):
    index = node.attrs["index"]
    return em.one("Gather", [em.input(node, 0), em.scalar(index)], em.out(node), axis=node.attrs["dim"])


@register_lowering("gather")
def _gather(em, node):
    return em.one("GatherElements", [em.input(node, 0), em.input(node, 1, torch.int64)], em.out(node),
                  axis=node.attrs["dim"])


@register_lowering("index_select")
def _index_select(em, node):
    return em.one("Gather", [em.input(node, 0), em.input(node, 1)], em.out(node), axis=node.attrs["dim"])


@register_lowering("arange")
def _arange(em, node):
    a = node.attrs
    dtype = a["dtype"]
    return em.one("Range", [em.scalar(a["start"], dtype), em.scalar(a["end"], dtype), em.literal(a["step"], dtype)],
                  em.out(node))


@register_lowering("full")
def _full(em, node):
    a = node.attrs
    dtype = a["dtype"]
    value = tensor_to_proto(torch.tensor([a["value"]], dtype=dtype), "value")
    return em.one("ConstantOfShape", [em.dims(list(a["shape"]))], em.out(node), value=value)


@register_lowering(ONNX_OPAQUE)
def _onnx_opaque(em, node):
    a = node.attrs
    captures = tuple(a["captures"])
    n_own = len(node.inputs) - len(captures)
    inputs = [em.input(node, i) for i in range(n_own)]
    present = [em.out(node, i) for i in range(len(node.outputs))]
    total = len(node.outputs) + len(a["skip_outputs"])
    skip = set(a["skip_outputs"])
    outputs, it = [], iter(present)
    for i in range(total):
        outputs.append("" if i in skip else next(it))
    protos = a["attributes"].protos() if a["attributes"] is not None else []
    renames = {old: em.input(node, n_own + j) for j, old in enumerate(captures)}
    renames = {k: v for k, v in renames.items() if k != v}
    if renames:
        protos = [_rename_captures(p, renames) for p in protos]
    for blob in a["functions"]:
        f = onnx.FunctionProto.FromString(blob)
        em.functions.setdefault((f.domain, f.name, getattr(f, "overload", "")), f)
    n = onnx.NodeProto()
    n.op_type = a["op_type"]
    if a["domain"]:
        n.domain = a["domain"]
    n.input.extend(inputs)
    n.output.extend(outputs)
    n.attribute.extend(protos)
    n.name = em.fresh_node_name(node.meta.get("onnx_name") or f"{a['op_type']}_{em.counter + 1}")
    em.counter += 1
    em.nodes.append(n)
    return present


def _rename_captures(attr: onnx.AttributeProto, renames: dict[str, str]) -> onnx.AttributeProto:
    if attr.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return attr
    attr = copy.deepcopy(attr)
    graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
    for g in graphs:
        _rename_in_graph(g, renames)
    return attr


def _rename_in_graph(g: onnx.GraphProto, renames: dict[str, str]) -> None:
    local = {vi.name for vi in g.input} | {t.name for t in g.initializer}
    active = {k: v for k, v in renames.items() if k not in local}
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in active:
                n.input[i] = active[name]
        for attr in n.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_in_graph(attr.g, active)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _rename_in_graph(sub, active)
    for o in g.output:
        if o.name in active:
            # a subgraph output that is directly an outer value: route it through an Identity
            inner = f"{o.name}__outer"
            g.node.append(helper.make_node("Identity", [active[o.name]], [inner]))
            o.name = inner


# ---- ATen opaque targets with an ONNX lowering ----------------------------------------------
@register_aten_lowering("aten::index.Tensor")
def _aten_index(em, node):
    args = node.attrs["args"]
    x = node.inputs[0]
    indices = list(args[1])
    tensor_positions = [(pos, item.index) for pos, item in enumerate(indices) if isinstance(item, TensorArg)]
    if any(item is not None and not isinstance(item, TensorArg) for item in indices):
        raise LoweringError(f"aten::index.Tensor with non-tensor indices (node {node.label()})")
    for _, idx in tensor_positions:
        if node.inputs[idx].type.dtype is torch.bool:
            raise LoweringError(f"no ONNX lowering for aten::index.Tensor with a boolean mask (node {node.label()})")
    out = node.outputs[0]
    if len(tensor_positions) == 1:
        pos, idx = tensor_positions[0]
        return em.one("Gather", [em.value(x), em.input(node, idx)], em.out(node), axis=pos)
    positions = [p for p, _ in tensor_positions]
    if positions != list(range(len(positions))):
        raise LoweringError(f"no ONNX lowering for aten::index.Tensor with non-leading tensor indices "
                            f"(node {node.label()})")
    k = len(positions)
    batch = list(out.type.shape[:out.type.rank - (x.type.rank - k)])
    target = em.dims(batch)
    stacked = []
    for _, idx in tensor_positions:
        expanded = em.one("Expand", [em.input(node, idx, torch.int64), target])
        stacked.append(em.one("Unsqueeze", [expanded, em.literal([-1])]))
    return em.one("GatherND", [em.value(x), em.one("Concat", stacked, axis=-1)], em.out(node))


def _aten_arg(node, index: int, name: str, default=None):
    args, kwargs = node.attrs["args"], node.attrs["kwargs"] or {}
    return args[index] if len(args) > index else kwargs.get(name, default)


@register_aten_lowering("aten::unbind.int")
def _aten_unbind(em, node):
    x = node.inputs[0]
    dim = _aten_arg(node, 1, "dim", 0) % x.type.rank
    n = len(node.outputs)
    parts = em.node("Split", [em.value(x), em.literal([1] * n)], [em.tmp(f"split{i}") for i in range(n)], axis=dim)
    axes = em.literal([dim])
    return [em.one("Squeeze", [part, axes], em.out(node, i)) for i, part in enumerate(parts)]



def _aten_tensor(em, node, index: int, name: str, dtype: torch.dtype | None = None) -> str:
    """The ONNX name of a tensor argument of an ATen node ("" when it is None)."""
    arg = _aten_arg(node, index, name)
    return em.input(node, arg.index, dtype) if isinstance(arg, TensorArg) else ""


def _aten_operand(em, node, index: int, name: str, dtype: torch.dtype) -> str:
    """A tensor or Python-scalar argument as an ONNX name of ``dtype``."""
    arg = _aten_arg(node, index, name)
    return em.input(node, arg.index, dtype) if isinstance(arg, TensorArg) else em.literal(arg, dtype)


def _axis(node, index: int, name: str, rank: int, default=0) -> int:
    return _aten_arg(node, index, name, default) % max(rank, 1)


for _target, _onnx in [("aten::min.other", "Min"), ("aten::max.other", "Max"),
                       ("aten::minimum.default", "Min"), ("aten::maximum.default", "Max")]:
    ATEN_LOWERINGS[_target] = (lambda op_type: lambda em, node: em.one(
        op_type, [_aten_operand(em, node, 0, "self", _out_dtype(node)),
                  _aten_operand(em, node, 1, "other", _out_dtype(node))], em.out(node)))(_onnx)


@register_aten_lowering("aten::cumsum")
def _aten_cumsum(em, node):
    """Bool and int32 inputs sum in the output dtype (int64), as torch does."""
    x = node.inputs[0]
    return em.one("CumSum", [em.input(node, 0, _out_dtype(node)), em.literal(_axis(node, 1, "dim", x.type.rank))],
                  em.out(node))


@register_aten_lowering("aten::diff")
def _aten_diff(em, node):
    """``x[1:] - x[:-1]`` along ``dim``, ``n`` times, after concatenating ``prepend`` and ``append``."""
    x = node.inputs[0]
    if x.type.dtype is torch.bool:
        raise LoweringError(f"no ONNX lowering for aten::diff of a boolean tensor (node {node.label()})")
    dim = _axis(node, 2, "dim", x.type.rank, -1)
    parts = [p for p in (_aten_tensor(em, node, 3, "prepend"), em.value(x), _aten_tensor(em, node, 4, "append")) if p]
    y = parts[0] if len(parts) == 1 else em.one("Concat", parts, axis=dim)
    axes, one = em.literal([dim]), em.literal([1])
    for _ in range(_aten_arg(node, 1, "n", 1)):
        later = em.one("Slice", [y, one, em.literal([INT64_MAX]), axes])
        earlier = em.one("Slice", [y, em.literal([0]), em.literal([-1]), axes])
        y = em.one("Sub", [later, earlier])
    return em.one("Identity", [y], em.out(node))


@register_aten_lowering("aten::argmax")
def _aten_argmax(em, node):
    x, dim = em.input(node, 0), _aten_arg(node, 1, "dim")
    keepdim = int(bool(_aten_arg(node, 2, "keepdim", False)))
    if dim is None:
        return em.one("ArgMax", [em.one("Reshape", [x, em.literal([-1])])], em.out(node), axis=0, keepdims=keepdim)
    return em.one("ArgMax", [x], em.out(node), axis=dim % node.inputs[0].type.rank, keepdims=keepdim)


@register_aten_lowering("aten::argsort")
@register_aten_lowering("aten::argsort.stable")
def _aten_argsort(em, node):
    """A full-length TopK, which puts equal values in index order (a stable sort, either direction)."""
    x = node.inputs[0]
    dim = _axis(node, 1, "dim", x.type.rank, -1)
    descending = bool(_aten_arg(node, 2, "descending", False))
    k = em.dim1(x.type.shape[dim])
    _, indices = em.node("TopK", [em.value(x), k], [em.tmp("values"), em.out(node)], axis=dim,
                         largest=int(descending), sorted=1)
    return indices


def _conv(em, node, spatial: int):
    """conv1d / conv2d, with list or string ('same' / 'valid') padding."""
    dtype = _out_dtype(node)
    w = node.inputs[1]
    kernel = list(w.type.shape[2:])
    if not all(isinstance(k, int) for k in kernel):
        raise LoweringError(f"convolution with a symbolic kernel size (node {node.label()})")
    expand = lambda v, default: list(v) * spatial if len(v) == 1 else list(v)
    stride = expand(_aten_arg(node, 3, "stride", [1]), 1)
    padding = _aten_arg(node, 4, "padding", [0])
    dilation = expand(_aten_arg(node, 5, "dilation", [1]), 1)
    if isinstance(padding, str):
        if padding == "valid":
            begin = end = [0] * spatial
        else:  # 'same' (stride 1): torch puts the odd element of padding at the end
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            begin = [t // 2 for t in total]
            end = [t - b for t, b in zip(total, begin)]
    else:
        begin = end = expand(padding, 0)
    inputs = [em.input(node, 0, dtype), em.input(node, 1, dtype)]
    bias = _aten_tensor(em, node, 2, "bias", dtype)
    if bias:
        inputs.append(bias)
    return em.one("Conv", inputs, em.out(node), strides=stride, dilations=dilation, pads=begin + end,
                  group=_aten_arg(node, 6, "groups", 1), kernel_shape=kernel)


register_aten_lowering("aten::conv1d")(lambda em, node: _conv(em, node, 1))
register_aten_lowering("aten::conv1d.padding")(lambda em, node: _conv(em, node, 1))
register_aten_lowering("aten::conv2d.padding")(lambda em, node: _conv(em, node, 2))


def _batch_norm(em, node, eps: float) -> str:
    """Inference batch norm with the running statistics (absent weight / bias: 1 / 0)."""
    dtype = _out_dtype(node)
    channels = node.inputs[0].type.shape[1]
    if not isinstance(channels, int):
        raise LoweringError(f"batch norm over a symbolic channel count (node {node.label()})")
    weight = _aten_tensor(em, node, 1, "weight", dtype) or em.literal([1.0] * channels, dtype)
    bias = _aten_tensor(em, node, 2, "bias", dtype) or em.literal([0.0] * channels, dtype)
    mean, var = _aten_tensor(em, node, 3, "running_mean", dtype), _aten_tensor(em, node, 4, "running_var", dtype)
    if not mean or not var:
        raise LoweringError(f"batch norm without running statistics (node {node.label()})")
    return em.one("BatchNormalization", [em.input(node, 0, dtype), weight, bias, mean, var], em.out(node, 0),
                  epsilon=float(eps))


@register_aten_lowering("aten::batch_norm")
def _aten_batch_norm(em, node):
    if _aten_arg(node, 5, "training", False):
        raise LoweringError(f"aten::batch_norm in training mode (node {node.label()})")
    return _batch_norm(em, node, _aten_arg(node, 7, "eps", 1e-5))


@register_aten_lowering("aten::_native_batch_norm_legit_no_training")
def _aten_native_batch_norm(em, node):
    """Outputs 1 and 2 (saved statistics) are empty at inference."""
    out = _batch_norm(em, node, _aten_arg(node, 6, "eps", 1e-5))
    empty = [em.one("Identity", [em.literal(torch.zeros(v.type.shape, dtype=v.type.dtype).tolist(), v.type.dtype,
                                            shape=v.type.shape)], em.out(node, i))
             for i, v in enumerate(node.outputs) if i > 0]
    return [out] + empty


@register_aten_lowering("aten::group_norm")
def _aten_group_norm(em, node):
    """Normalize each of ``num_groups`` channel groups over its channels and positions, then scale per channel."""
    dtype = _out_dtype(node)
    x = node.inputs[0]
    groups, eps = _aten_arg(node, 1, "num_groups"), float(_aten_arg(node, 4, "eps", 1e-5))
    xv = em.input(node, 0, dtype)
    grouped = em.one("Reshape", [xv, em.literal([0, groups, -1])])
    centered = em.one("Sub", [grouped, _reduce_mean(em, grouped, [2], 1)])
    var = _reduce_mean(em, em.one("Mul", [centered, centered]), [2], 1)
    normed = em.one("Div", [centered, em.one("Sqrt", [em.one("Add", [var, em.literal(eps, dtype)])])])
    y = em.one("Reshape", [normed, em.one("Shape", [xv])])
    per_channel = em.literal([-1] + [1] * (x.type.rank - 2))
    for index, name, op_type in ((2, "weight", "Mul"), (3, "bias", "Add")):
        arg = _aten_tensor(em, node, index, name, dtype)
        if arg:
            y = em.one(op_type, [y, em.one("Reshape", [arg, per_channel])])
    return em.one("Identity", [y], em.out(node))


@register_aten_lowering("aten::_weight_norm")
def _aten_weight_norm(em, node):
    """``g * v / ||v||``, the norm over every axis but ``dim``."""
    v, g = node.inputs[0], em.input(node, 1)
    dim = _aten_arg(node, 2, "dim", 0)
    axes = [a for a in range(v.type.rank) if a != dim % v.type.rank]
    vv = em.value(v)
    norm = em.one("Sqrt", [em.one("ReduceSum", [em.one("Mul", [vv, vv]), em.literal(axes)], keepdims=1)])
    return em.one("Mul", [g, em.one("Div", [vv, norm])], em.out(node))


@register_aten_lowering("aten::pad")
@register_aten_lowering("aten::constant_pad_nd")
def _aten_pad(em, node):
    """torch lists (begin, end) pairs from the last axis backwards; ONNX all begins, then all ends."""
    x = node.inputs[0]
    pads = list(_aten_arg(node, 1, "pad"))
    is_pad = node.attrs["target"] == "aten::pad"
    mode = _aten_arg(node, 2, "mode", "constant") if is_pad else "constant"
    value = _aten_arg(node, 3 if is_pad else 2, "value", None) or 0
    modes = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
    if mode not in modes or not all(isinstance(p, int) for p in pads):
        raise LoweringError(f"aten::pad with mode {mode!r} or symbolic pads (node {node.label()})")
    rank = x.type.rank
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pads) // 2):
        begin[rank - 1 - i], end[rank - 1 - i] = pads[2 * i], pads[2 * i + 1]
    if not any(begin + end):
        return em.one("Identity", [em.value(x)], em.out(node))
    inputs = [em.value(x), em.literal(begin + end)]
    if mode == "constant":
        inputs.append(em.literal(value, x.type.dtype))
    return em.one("Pad", inputs, em.out(node), mode=modes[mode])


@register_aten_lowering("aten::max_pool2d")
def _aten_max_pool2d(em, node):
    pair = lambda v: list(v) * 2 if len(v) == 1 else list(v)
    kernel = pair(_aten_arg(node, 1, "kernel_size"))
    stride = pair(_aten_arg(node, 2, "stride", None) or kernel)
    padding = pair(_aten_arg(node, 3, "padding", [0]))
    dilation = pair(_aten_arg(node, 4, "dilation", [1]))
    return em.one("MaxPool", [em.input(node, 0)], em.out(node), kernel_shape=kernel, strides=stride,
                  pads=padding + padding, dilations=dilation, ceil_mode=int(bool(_aten_arg(node, 5, "ceil_mode", False))))


def _adaptive_avg_pool(em, node):
    """Output size 1 is a mean; an output size that divides the input is an AveragePool."""
    x = node.inputs[0]
    out = list(_aten_arg(node, 1, "output_size"))
    spatial = list(x.type.shape[-len(out):])
    if all(o == 1 for o in out):
        return _reduce_mean(em, em.value(x), list(range(x.type.rank - len(out), x.type.rank)), 1, em.out(node))
    if not all(isinstance(s, int) and s % o == 0 for s, o in zip(spatial, out)):
        raise LoweringError(f"{node.attrs['target']} from {spatial} to {out}: only sizes that divide the input "
                            f"(node {node.label()})")
    kernel = [s // o for s, o in zip(spatial, out)]
    return em.one("AveragePool", [em.value(x)], em.out(node), kernel_shape=kernel, strides=kernel)


register_aten_lowering("aten::adaptive_avg_pool1d")(_adaptive_avg_pool)
register_aten_lowering("aten::adaptive_avg_pool2d")(_adaptive_avg_pool)
register_aten_lowering("aten::_adaptive_avg_pool2d")(_adaptive_avg_pool)


@register_aten_lowering("aten::upsample_bilinear2d.vec")
@register_aten_lowering("aten::upsample_nearest2d.vec")
@register_aten_lowering("aten::upsample_bicubic2d.vec")
def _aten_upsample(em, node):
    """Resize to the captured output size; torch's coordinate conventions map to ONNX's by name."""
    target = node.attrs["target"]
    x, out = node.inputs[0], node.outputs[0]
    if "nearest" in target:
        mode, attrs = "nearest", {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    else:
        align = bool(_aten_arg(node, 2, "align_corners", False))
        mode = "linear" if "bilinear" in target else "cubic"
        attrs = {"coordinate_transformation_mode": "align_corners" if align else "pytorch_half_pixel"}
        if mode == "cubic":
            attrs["cubic_coeff_a"] = -0.75
    scales = _aten_arg(node, 3 if "nearest" not in target else 2, "scale_factors")
    if scales is not None and _aten_arg(node, 1, "output_size") is None and not attrs.get(
            "coordinate_transformation_mode") == "align_corners":
        # torch maps coordinates with the given scale factor, not with output/input sizes
        factors = em.literal([1.0, 1.0] + [float(f) for f in scales], torch.float32)
        return em.one("Resize", [em.value(x), "", factors], em.out(node), mode=mode, **attrs)
    return em.one("Resize", [em.value(x), "", "", em.dims(list(out.type.shape))], em.out(node), mode=mode, **attrs)


@register_aten_lowering("aten::repeat")
def _aten_repeat(em, node):
    x = node.inputs[0]
    repeats = list(_aten_arg(node, 1, "repeats"))
    xv = em.value(x)
    if len(repeats) > x.type.rank:
        xv = em.one("Reshape", [xv, em.dims([1] * (len(repeats) - x.type.rank) + list(x.type.shape))])
    return em.one("Tile", [xv, em.dims(repeats)], em.out(node))


@register_aten_lowering("aten::stack")
def _aten_stack(em, node):
    dim = _aten_arg(node, 1, "dim", 0) % node.outputs[0].type.rank
    dtype = _out_dtype(node)
    axes = em.literal([dim])
    parts = [em.one("Unsqueeze", [em.input(node, a.index, dtype), axes]) for a in _aten_arg(node, 0, "tensors")]
    return em.one("Concat", parts, em.out(node), axis=dim)


@register_aten_lowering("aten::meshgrid.indexing")
@register_aten_lowering("aten::meshgrid")
def _aten_meshgrid(em, node):
    tensors = _aten_arg(node, 0, "tensors")
    indexing = (node.attrs["kwargs"] or {}).get("indexing", _aten_arg(node, 1, "indexing", "ij"))
    n = len(tensors)
    full = em.dims(list(node.outputs[0].type.shape))
    order = list(range(n))
    if indexing == "xy" and n >= 2:
        order[0], order[1] = 1, 0
    results = []
    for i, arg in enumerate(tensors):
        shape = [1] * n
        shape[order[i]] = -1
        column = em.one("Reshape", [em.input(node, arg.index), em.literal(shape)])
        results.append(em.one("Expand", [column, full], em.out(node, i)))
    return results


@register_aten_lowering("aten::copy")
@register_aten_lowering("aten::fill.Tensor")
@register_aten_lowering("aten::fill.Scalar")
def _aten_fill(em, node):
    """``copy(self, src)`` / ``fill(self, value)``: the source broadcast to self's shape and dtype."""
    out = node.outputs[0]
    src = _aten_operand(em, node, 1, "src", out.type.dtype)
    return em.one("Expand", [src, em.one("Shape", [em.input(node, 0)])], em.out(node))


def _scatter_into(em, node, dim: int, start, stop, piece: str) -> str:
    """``self`` with positions [start, stop) along ``dim`` replaced by ``piece``."""
    x = node.inputs[0]
    axes = em.literal([dim])
    before = em.one("Slice", [em.value(x), em.literal([0]), _bound(em, start), axes])
    after = em.one("Slice", [em.value(x), _bound(em, stop), em.literal([INT64_MAX]), axes])
    return em.one("Concat", [before, piece, after], em.out(node), axis=dim)


@register_aten_lowering("aten::select_scatter")
def _aten_select_scatter(em, node):
    x = node.inputs[0]
    dim = _axis(node, 2, "dim", x.type.rank)
    index = _aten_arg(node, 3, "index")
    if not isinstance(index, int) or (index < 0 and not isinstance(x.type.shape[dim], int)):
        raise LoweringError(f"aten::select_scatter at a symbolic or negative index (node {node.label()})")
    index = index % x.type.shape[dim] if index < 0 else index
    piece = em.one("Unsqueeze", [em.input(node, 1, x.type.dtype), em.literal([dim])])
    return _scatter_into(em, node, dim, index, index + 1, piece)


@register_aten_lowering("aten::slice_scatter")
def _aten_slice_scatter(em, node):
    x = node.inputs[0]
    dim = _axis(node, 2, "dim", x.type.rank)
    start = _aten_arg(node, 3, "start", None) or 0
    end = _aten_arg(node, 4, "end", None)
    step = _aten_arg(node, 5, "step", 1)
    size = x.type.shape[dim]
    end = size if end is None or (isinstance(end, int) and isinstance(size, int) and end >= size) else end
    if step != 1 or any(isinstance(v, int) and v < 0 for v in (start, end)):
        raise LoweringError(f"aten::slice_scatter with a step or negative bounds (node {node.label()})")
    return _scatter_into(em, node, dim, start, end, em.input(node, 1, x.type.dtype))


# The lowerings beside this module (token, integer, low-rank ops) register as soon as it is imported.
load_lowerings()
