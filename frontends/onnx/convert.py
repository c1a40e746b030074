"""ONNX graph -> IR graph (``from_onnx``).

* The model is read and checked first (``load``, ``validate``); files older than opset 13 are
  converted (``opset``).
* Types come from ``onnx.shape_inference``; named dims (``dim_param``) become sympy symbols of the
  same name, so ``batch`` and ``sequence`` stay symbolic through the IR.
* Shape computations (``Shape -> Gather -> Concat -> Reshape``) are evaluated symbolically
  (``shape_eval``), so a reshape to ``[batch, 197, 6, 64]`` is an ordinary IR ``reshape``; the shape
  subgraph then has no users and is dropped.
* ONNX ops with an IR equivalent map to IR ops (the ``handlers`` registry); every other op, in any
  domain, becomes an ``onnx_opaque`` node (``opaque``) that keeps its domain, attributes and outputs
  exactly, so optimizing never loses an op. A translation whose result type disagrees with ONNX's
  own shape inference is discarded in favour of the opaque node.
"""
from __future__ import annotations

import ast
import collections
import os
import re

import numpy as np
import onnx
import sympy
import torch
from onnx import helper

from graphopt.frontends import FrontendError, OnnxLoadError, Unsupported
from graphopt.frontends.onnx import handlers_math, handlers_nn, handlers_shape  # noqa: F401  (register the built-ins)
from graphopt.frontends.onnx.handlers import HANDLERS, handler_key
from graphopt.frontends.onnx.load import (copy_model, densify_sparse_initializers, external_tensors, load_external,
                                          load_model, parse_model)
from graphopt.frontends.onnx.opaque import add_opaque
from graphopt.frontends.onnx.opset import upgrade_opset
from graphopt.frontends.onnx.shape_eval import FOLDABLE, as_object_array, propagate
from graphopt.frontends.onnx.validate import (DEFAULT_DOMAINS, check_model_structure, opsets_of, subgraph_free_names,
                                              topological_order)
from graphopt.ir import Graph, OpError, TensorType, Value, verify
from graphopt.ir.onnx_common import ONNX_TO_TORCH, parse_dim_param, sanitize_symbol_name, tensor_from_proto, torch_dtype
from graphopt.ir.types import dims_equal, format_dim, symbol

KNOWN_LIMIT = 64  # small integer tensors (shape vectors) are tracked symbolically up to this many elements


def from_onnx(model: str | os.PathLike | onnx.ModelProto | bytes, *, name: str | None = None,
              base_dir: str | None = None) -> Graph:
    """An ONNX model (path, bytes or ``ModelProto``) as an IR graph.

    External data of a ``ModelProto`` is read from ``base_dir`` (refused outside it)."""
    if isinstance(model, (str, os.PathLike)):
        where = os.fspath(model)
        proto = load_model(model)
        default_name = os.path.splitext(os.path.basename(where))[0]
    else:
        where = "model"
        if isinstance(model, bytes):
            proto = parse_model(model, where)
        elif isinstance(model, onnx.ModelProto):
            proto = model
            check_model_structure(proto, where)
        else:
            raise TypeError(f"from_onnx takes a path, bytes or onnx.ModelProto, not {type(model).__name__}")
        if external_tensors(proto):
            if base_dir is None:
                raise OnnxLoadError("model: it keeps tensors in external data files; pass base_dir=the model's folder")
            proto = copy_model(proto)
            load_external(proto, base_dir, where)
        default_name = proto.graph.name or "main"
    proto = densify_sparse_initializers(proto, where)
    return _Converter(proto, name or default_name or "main", where).run()


def module_path(node: onnx.NodeProto) -> str | None:
    """The torch module a node came from, as the torch.onnx (dynamo) exporter records it in the node's
    metadata (``pkg.torch.onnx.name_scopes`` ['', 'blocks.0', 'blocks.0.fc1', 'linear'], or the
    ``namespace`` string): its value names (``val_28``) say nothing, but ``layers=`` patterns need it."""
    props = {p.key: p.value for p in node.metadata_props}
    scopes = props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            names = None
        if isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names):
            return names[-2] or None
    namespace = props.get("namespace")
    if namespace:  # ": pkg.M/blocks.0: pkg.Block/blocks.0.fc1: Linear/linear: aten.linear.default"
        paths = [part.split(":")[0].strip() for part in namespace.split("/")]
        return paths[-2] or None if len(paths) >= 2 else None
    return None


class _Converter:
    def __init__(self, model: onnx.ModelProto, name: str, where: str):
        model = upgrade_opset(model, where)
        self.model = model
        self.where = where
        self.graph = Graph(name)
        self.opsets = opsets_of(model)
        self.env: dict[str, Value] = {}
        self.known: dict[str, np.ndarray] = {}
        self.onnx_types: dict[str, onnx.TypeProto] = {}
        self.dim_originals: dict[str, str] = {}
        self.anonymous: list[str] = []
        self.input_symbols: set[sympy.Symbol] = set()
        self.used: set[str] = set()
        self.use_counts: collections.Counter = collections.Counter()
        self.transposed: dict[int, Value] = {}  # constant id -> its transpose, for MatMul weights read as linear
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.param_names: set[str] = set()
        self._unk = 0

    # ---- helpers for the op handlers -------------------------------------------------------
    @property
    def op(self):
        return self.graph.op

    def const(self, name: str) -> torch.Tensor | None:
        value = self.env.get(name) if name else None
        return value.const if value is not None and value.is_constant else None

    def known_value(self, name: str) -> np.ndarray | None:
        return self.known.get(name) if name else None

    def known_ints(self, name: str) -> list | None:
        """The entries of a small integer tensor (ints or sympy dims), flattened, or None."""
        value = self.known_value(name)
        if value is None:
            return None
        return [e for e in value.reshape(-1).tolist()]

    def concrete_ints(self, name: str) -> list[int] | None:
        values = self.known_ints(name)
        if values is None or not all(isinstance(v, (int, np.integer)) for v in values):
            return None
        return [int(v) for v in values]

    def is_used(self, name: str) -> bool:
        return bool(name) and name in self.used

    def use_count(self, name: str) -> int:
        """How many node inputs, subgraph reads and graph outputs read ``name``."""
        return self.use_counts.get(name, 0)

    def bound(self, dims) -> bool:
        """Every symbol in ``dims`` is the size of some graph input axis (so backends can compute it)."""
        for d in dims:
            if not isinstance(d, int) and not d.free_symbols <= self.input_symbols:
                return False
        return True

    def onnx_type(self, name: str) -> tuple:
        """(torch dtype or None, dims or None) from whole-model shape inference; unknown dims are None."""
        proto = self.onnx_types.get(name)
        if proto is None or not proto.HasField("tensor_type"):
            return None, None
        tt = proto.tensor_type
        dtype = ONNX_TO_TORCH.get(tt.elem_type) if tt.elem_type else None
        if not tt.HasField("shape"):
            return dtype, None
        return dtype, [self.dim(d, fresh=False) for d in tt.shape.dim]

    def scalar(self, value, dtype: torch.dtype) -> Value:
        return self.graph.add_constant(torch.tensor(value, dtype=dtype), "scalar")

    def tensor_const(self, tensor: torch.Tensor, base: str = "c") -> Value:
        return self.graph.add_constant(tensor, base)

    # ---- dims --------------------------------------------------------------------------------
    def dim(self, d, fresh: bool):
        """``fresh``: a graph input's dim (unknown ones get a fresh symbol). Elsewhere an unknown dim,
        or a label shape inference made up for one (``unk__3``, numbered per run), is None."""
        if d.HasField("dim_value"):
            return int(d.dim_value)
        if d.HasField("dim_param") and d.dim_param:
            named = self._param(d.dim_param) if fresh else self.named_dim(d.dim_param)
            if named is not None:
                return named
        return self.fresh_dim() if fresh else None

    def named_dim(self, text: str):
        """The dim a shape inference's label names, or None for a label it made up (``unk__3``)."""
        return None if not text or _INFERENCE_LABEL.fullmatch(text) else self._param(text)

    def _param(self, text: str):
        value = parse_dim_param(text)
        if value is not None:
            if not isinstance(value, int):
                self.param_names.update(s.name for s in value.free_symbols)
            return value
        name = sanitize_symbol_name(text)
        while name in self.dim_originals and self.dim_originals[name] != text:
            name += "_"
        self.dim_originals[name] = text
        self.param_names.add(name)
        return symbol(name)

    def fresh_dim(self):
        """A new symbol (``unk_0``, ``unk_1``, ...) for a size nothing names."""
        while True:
            name = f"unk_{self._unk}"
            self._unk += 1
            if name not in self.param_names:
                self.param_names.add(name)
                self.anonymous.append(name)
                return symbol(name)

    def _type_from_proto(self, proto: onnx.TypeProto, what: str) -> TensorType:
        if not proto.HasField("tensor_type"):
            kind = proto.WhichOneof("value") or "untyped"
            raise OnnxLoadError(f"{self.where}: {what} is a {kind.replace('_type', '')} value; the IR holds tensors only")
        tt = proto.tensor_type
        try:
            dtype = torch_dtype(tt.elem_type, what)
        except TypeError as e:
            raise OnnxLoadError(f"{self.where}: {e}") from None
        if not tt.HasField("shape"):
            raise OnnxLoadError(f"{self.where}: {what} has no shape (not even a rank); give it one in the model")
        return TensorType(dtype, tuple(self.dim(d, fresh=True) for d in tt.shape.dim))

    # ---- the conversion ----------------------------------------------------------------------
    def run(self) -> Graph:
        g = self.model.graph
        self.onnx_types = self._inferred_types()
        for node in g.node:
            self.use_counts.update(n for n in node.input if n)
            self.use_counts.update(subgraph_free_names(node))
        self.use_counts.update(o.name for o in g.output)
        self.used = set(self.use_counts)

        initializer_names = {t.name for t in g.initializer} | {s.values.name for s in g.sparse_initializer}
        for vi in g.input:
            if vi.name in initializer_names:
                continue  # an initializer listed as an input (IR < 4 style): it is a constant
            t = self._type_from_proto(vi.type, f"graph input '{vi.name}'")
            value = self.graph.add_input(vi.name, t)
            self.env[vi.name] = value
            for d in t.shape:
                if isinstance(d, sympy.Symbol):
                    self.input_symbols.add(d)
        for init in g.initializer:
            self._add_constant(init.name, init)
        for sparse in g.sparse_initializer:
            self._add_constant(sparse.values.name, onnx.numpy_helper.to_array(sparse))

        order = topological_order(g, self.where)
        for index in order:
            self._convert(g.node[index], index)

        outputs, names = [], []
        for out in g.output:
            outputs.append(self.env[out.name])
            names.append(out.name)
        self.graph.set_outputs(outputs)
        self.graph.remove_dead(keep_impure=False)
        self._record_meta(names)
        try:
            verify(self.graph)
        except Exception as e:  # a bug in a handler; name it rather than failing later
            raise FrontendError(f"{self.where}: the translated graph does not verify: {e}") from e
        return self.graph

    def _record_meta(self, output_names):
        m = self.model
        output_types = {}
        for out in m.graph.output:
            if out.type.HasField("tensor_type"):
                output_types[out.name] = out.type.SerializeToString()
        self.graph.meta.update(
            source="onnx",
            onnx_opsets=dict(sorted(self.opsets.items())),
            onnx_ir_version=int(m.ir_version),
            onnx_output_names=list(output_names),
            onnx_dim_params=dict(self.dim_originals),
            onnx_anonymous_dims=list(self.anonymous),
            onnx_model_info={"producer_name": m.producer_name, "producer_version": m.producer_version,
                             "domain": m.domain, "model_version": int(m.model_version), "doc_string": m.doc_string,
                             "graph_doc_string": m.graph.doc_string,
                             "metadata_props": [(p.key, p.value) for p in m.metadata_props]},
            symbols=sorted(str(s) for s in self.input_symbols),
        )

    def _add_constant(self, name: str, init) -> None:
        try:
            tensor = init if isinstance(init, torch.Tensor) else (
                torch.from_numpy(np.array(init, copy=True)) if isinstance(init, np.ndarray) else tensor_from_proto(init, name))
        except TypeError as e:
            raise OnnxLoadError(f"{self.where}: initializer '{name}': {e}") from None
        value = self.graph.add_constant(tensor, name)
        self.env[name] = value
        self.remember(name, tensor)

    def remember(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.numel() <= KNOWN_LIMIT and tensor.dim() <= 1 and tensor.dtype in (torch.int64, torch.int32):
            self.known[name] = np.array(tensor.tolist(), dtype=object).reshape(tuple(tensor.shape))

    def _convert(self, node: onnx.NodeProto, index: int) -> None:
        domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
        ins = [self.env[n] if n else None for n in node.input]
        outs = list(node.output)
        if domain == "":
            try:
                results = propagate(self, node, ins)
            except Exception:  # symbolic evaluation is best effort
                results = None
            if results:
                for name, value in zip(outs, results):
                    if name and value is not None:
                        value = as_object_array(value)
                        if value.size <= KNOWN_LIMIT:
                            self.known[name] = value
                if self._fold(node, outs):
                    return
        handler = HANDLERS.find(handler_key(domain, node.op_type)) if not subgraph_free_names(node) else None
        mark = self.graph.checkpoint()
        reason = "no IR op for this ONNX op" if domain == "" else f"op of domain {domain}"
        if handler is not None:
            try:
                result = handler(self, node, ins)
                values = list(result) if isinstance(result, (list, tuple)) else [result]
                values += [None] * (len(outs) - len(values))
                problem = self._check_result(node, outs, values)
                if problem is None:
                    self._adopt(node, outs, values, mark)
                    mark.release()
                    return
                reason = problem
            except Exception as e:  # a handler is best effort: whatever it cannot do stays an opaque node
                reason = str(e) if isinstance(e, (Unsupported, OpError)) else f"{type(e).__name__}: {e}"
            mark.rollback()
        mark.release()
        add_opaque(self, node, index, domain, ins, reason)

    def _fold(self, node, outs) -> bool:
        """Shape arithmetic whose result is fully known (static shapes) becomes constants."""
        if node.op_type not in FOLDABLE or not all(not o or o in self.known for o in outs):
            return False
        tensors = []
        for name in outs:
            if not name:
                tensors.append(None)
                continue
            value = self.known[name]
            entries = value.reshape(-1).tolist()
            if not all(isinstance(e, (bool, int)) for e in entries):
                return False
            dtype = self.onnx_type(name)[0] or (torch.bool if all(isinstance(e, bool) for e in entries) else torch.int64)
            if dtype.is_floating_point:
                return False
            if dtype is not torch.bool and any(not _fits(e, dtype) for e in entries):
                raise OnnxLoadError(f"{self.where}: the {node.op_type} node computing '{name}' gets {entries} in "
                                    f"shape arithmetic, which overflows {dtype}")
            tensors.append(torch.tensor(entries, dtype=dtype).reshape(value.shape))
        for name, tensor in zip(outs, tensors):
            if tensor is not None:
                self.env[name] = self.graph.add_constant(tensor, name)
        return True

    def _check_result(self, node, outs, values) -> str | None:
        for name, value in zip(outs, values):
            if not name:
                continue
            if value is None:
                if self.is_used(name) or name in {o.name for o in self.model.graph.output}:
                    return f"output '{name}' has no IR translation"
                continue
            dtype, dims = self.onnx_type(name)
            t = value.type
            if dtype is not None and dtype != t.dtype:
                return f"translation gives {t} but ONNX infers {dtype} for '{name}'"
            if dims is None:
                continue
            if len(dims) != t.rank:
                return f"translation gives {t} but ONNX infers rank {len(dims)} for '{name}'"
            for ours, theirs in zip(t.shape, dims):
                # a contradiction is a static size that differs, or a graph input's dim name where the
                # translation has something else; other labels (Min(512,sequence)) are informational
                if isinstance(theirs, int):
                    conflict = not (isinstance(ours, int) and ours == theirs)
                elif isinstance(theirs, sympy.Symbol) and theirs in self.input_symbols:
                    conflict = not dims_equal(ours, theirs)
                else:
                    conflict = False
                if conflict:
                    return f"translation gives {t} but ONNX infers {[format_dim(d) if d is not None else '?' for d in dims]}"
        return None

    def _adopt(self, node, outs, values, mark):
        created = set()
        module = module_path(node)
        for n in mark.created_nodes():
            created.add(id(n))
            n.meta.setdefault("onnx_name", node.name)
            n.meta.setdefault("source", node.name or node.op_type)
            if module:
                n.meta.setdefault("module", module)
        for name, value in zip(outs, values):
            if not name or value is None:
                continue
            if value.producer is not None and id(value.producer) in created and value.name != name \
                    and not self.graph.has_name(name):
                self.graph.rename(value, name)
            self.env[name] = value


    # ---- whole-model shape inference ---------------------------------------------------------
    def _inferred_types(self) -> dict[str, onnx.TypeProto]:
        skeleton = _skeleton(self.model)
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
        except Exception:  # shape inference is advisory; keep whatever the file declares
            inferred = skeleton
        types = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
            types[vi.name] = vi.type
        return types


_INFERENCE_LABEL = re.compile(r"unk__\d+")


def _fits(entry: int, dtype: torch.dtype) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= int(entry) <= info.max


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large initializers (they become typed inputs), for fast shape inference."""
    g = model.graph
    skeleton_graph = onnx.GraphProto()
    skeleton_graph.name = g.name
    skeleton_graph.node.extend(g.node)
    skeleton_graph.output.extend(g.output)
    skeleton_graph.value_info.extend(g.value_info)
    declared = {vi.name for vi in g.input}
    skeleton_graph.input.extend(g.input)
    for init in g.initializer:
        numel = int(np.prod(init.dims)) if len(init.dims) else 1
        if numel <= 4096 and init.data_location != onnx.TensorProto.EXTERNAL:
            skeleton_graph.initializer.append(init)
        elif init.name not in declared:
            skeleton_graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    skeleton_graph.sparse_initializer.extend(g.sparse_initializer)
    m = onnx.ModelProto()
    m.ir_version = max(model.ir_version, 4)
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.CopyFrom(skeleton_graph)
    return m


__all__ = ["KNOWN_LIMIT", "from_onnx", "module_path"]
