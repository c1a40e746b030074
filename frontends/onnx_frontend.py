"""ONNX frontend: load an ``.onnx`` file (opsets 13 to the newest ``onnx`` knows; older files are
converted with ``onnx.version_converter``, with an ``OpsetConverted`` warning) into the IR.

* Loading is defensive: a file that is not ONNX, is truncated, has a cycle, reads a value nothing
  defines (a missing initializer), uses an opset outside the supported range, or keeps external
  data outside the model's folder raises ``OnnxLoadError`` with a one-line message naming the
  problem. External data files must sit inside the model's folder (symlinks are resolved).
* Types come from ``onnx.shape_inference``; named dims (``dim_param``) become sympy symbols of the
  same name, so ``batch`` and ``sequence`` stay symbolic through the IR.
* Shape computations (``Shape -> Gather -> Concat -> Reshape``) are evaluated symbolically, so a
  reshape to ``[batch, 197, 6, 64]`` is an ordinary IR ``reshape``; the shape subgraph then has no
  users and is dropped.
* ONNX ops with an IR equivalent map to IR ops (see ``onnx_ops``); every other op, in any domain,
  becomes an ``onnx_opaque`` node that keeps its domain, attributes and outputs exactly, so
  optimizing never loses an op. A translation whose result type disagrees with ONNX's own shape
  inference is discarded in favour of the opaque node.
"""
from __future__ import annotations

import collections
import os
import re
import warnings

import numpy as np
import onnx
import sympy
import torch
from onnx import helper

from graphopt.frontends import FrontendError
from graphopt.frontends.onnx_load import (OnnxLoadError, densify_sparse_initializers, read_model_bytes,
                                          tensor_byte_size, validate_model)
from graphopt.frontends.onnx_ops import HANDLERS, Unsupported, propagate
from graphopt.ir import Graph, OpError, TensorType, Value, verify
from graphopt.ir.onnx_common import (ONNX_TO_TORCH, onnx_dtype, parse_dim_param, sanitize_symbol_name,
                                     tensor_from_proto, torch_dtype)
from graphopt.ir.ops.onnx_opaque import OP as OPAQUE, OnnxAttributes
from graphopt.ir.types import dims_equal, format_dim, symbol

MIN_OPSET = 13
CONVERT_TO_OPSET = 17  # older files are converted to this opset (onnx.version_converter)
MAX_OPSET = onnx.defs.onnx_opset_version()
KNOWN_LIMIT = 64  # small integer tensors (shape vectors) are tracked symbolically up to this many elements
DEFAULT_DOMAINS = ("", "ai.onnx")


# =============================================================================================
# Loading and validation
# =============================================================================================
def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read and validate an ONNX file; external data is loaded only from inside the model's folder."""
    path = os.fspath(path)
    model = parse_model(read_model_bytes(path), path)
    base = os.path.dirname(os.path.abspath(path))
    if load_external_data:
        load_external(model, base, path)
    return model


def parse_model(data: bytes, where: str = "<bytes>") -> onnx.ModelProto:
    if not data:
        raise OnnxLoadError(f"{where}: the file is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError and friends
        if _looks_like_onnx_prefix(data):
            raise OnnxLoadError(f"{where}: the ONNX file is truncated or corrupt (protobuf cannot parse it: "
                                f"{_first_line(e)})") from None
        raise OnnxLoadError(f"{where}: not an ONNX model (protobuf cannot parse it)") from None
    if not model.HasField("graph") or model.ir_version <= 0 or (not model.opset_import and not model.graph.node):
        raise OnnxLoadError(f"{where}: not an ONNX model (no graph, IR version or opset imports)")
    check_model_structure(model, where)
    return model


def _looks_like_onnx_prefix(data: bytes) -> bool:
    """ONNX files start with field 1 (ir_version, varint): byte 0x08 then a small version number."""
    return len(data) >= 2 and data[0] == 0x08 and 1 <= data[1] <= 64


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def opsets_of(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if imp.domain in DEFAULT_DOMAINS else imp.domain): int(imp.version) for imp in model.opset_import}


def check_model_structure(model: onnx.ModelProto, where: str = "model") -> None:
    """Well-formed tensors, types and strings (``onnx_load.validate_model``), opset range, single
    definitions, no reads of undefined values, no cycles."""
    validate_model(model, where)
    opsets = opsets_of(model)
    uses_default = any((n.domain or "") in DEFAULT_DOMAINS for n in model.graph.node)
    if "" not in opsets and uses_default:
        raise OnnxLoadError(f"{where}: the model imports no ai.onnx opset but uses ai.onnx ops")
    version = opsets.get("")
    if version is not None and not 1 <= version <= MAX_OPSET:  # below MIN_OPSET: converted by from_onnx
        raise OnnxLoadError(f"{where}: ai.onnx opset {version} is not supported (graphopt reads opsets "
                            f"{MIN_OPSET} to {MAX_OPSET}, and converts older ones); this onnx {onnx.__version__} "
                            f"knows opsets up to {MAX_OPSET}")
    graph = model.graph
    defined: dict[str, str] = {}
    for vi in graph.input:
        defined.setdefault(vi.name, "graph input")
    for init in graph.initializer:
        defined[init.name] = "initializer"
    for sparse in graph.sparse_initializer:
        defined[sparse.values.name] = "initializer"
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if not out:
                continue
            if out in producer or defined.get(out) == "initializer":
                raise OnnxLoadError(f"{where}: value '{out}' is defined twice ({node_label(node, i)} redefines it)")
            producer[out] = i
    for i, node in enumerate(graph.node):
        for name in list(node.input) + sorted(subgraph_free_names(node)):
            if name and name not in defined and name not in producer:
                raise OnnxLoadError(f"{where}: {node_label(node, i)} reads '{name}', which no node, graph input or "
                                    "initializer defines (missing initializer?)")
    for out in graph.output:
        if out.name not in defined and out.name not in producer:
            raise OnnxLoadError(f"{where}: graph output '{out.name}' is not produced by any node")
    topological_order(graph, where, producer)


def node_label(node: onnx.NodeProto, index: int) -> str:
    op = f"{node.domain}::{node.op_type}" if node.domain and node.domain not in DEFAULT_DOMAINS else node.op_type
    return f"node '{node.name}' ({op})" if node.name else f"node #{index} ({op})"


def module_path(node: onnx.NodeProto) -> str | None:
    """The torch module a node came from, as the torch.onnx (dynamo) exporter records it in the node's
    metadata (``pkg.torch.onnx.name_scopes`` ['', 'blocks.0', 'blocks.0.fc1', 'linear'], or the
    ``namespace`` string): its value names (``val_28``) say nothing, but ``layers=`` patterns need it."""
    import ast

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


def subgraph_free_names(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names read by the node's subgraphs (If/Loop/Scan bodies)."""
    free: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            free |= _graph_free_names(g)
    return free


def _graph_free_names(graph: onnx.GraphProto) -> set[str]:
    local = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    local |= {s.values.name for s in graph.sparse_initializer}
    free: set[str] = set()
    for node in graph.node:
        for name in list(node.input) + sorted(subgraph_free_names(node)):
            if name and name not in local:
                free.add(name)
        local.update(o for o in node.output if o)
    free |= {o.name for o in graph.output if o.name not in local}
    return free


def topological_order(graph: onnx.GraphProto, where: str = "model", producer: dict[str, int] | None = None) -> list[int]:
    """Node indices in an order where every value is defined before use (the file order when it is one)."""
    if producer is None:
        producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    deps: list[set[int]] = []
    for i, node in enumerate(graph.node):
        names = list(node.input) + sorted(subgraph_free_names(node))
        deps.append({producer[n] for n in names if n in producer and producer[n] != i})
    self_loops = [i for i, node in enumerate(graph.node) if any(producer.get(n) == i for n in node.input if n)]
    if self_loops:
        i = self_loops[0]
        raise OnnxLoadError(f"{where}: the graph has a cycle: {node_label(graph.node[i], i)} reads its own output")
    users: list[list[int]] = [[] for _ in graph.node]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    pending = [len(ds) for ds in deps]
    import heapq

    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(graph.node):
        stuck = [i for i in range(len(graph.node)) if pending[i] > 0]
        cycle = _find_cycle(stuck, deps)
        path = " -> ".join(node_label(graph.node[i], i) for i in cycle)
        raise OnnxLoadError(f"{where}: the graph has a cycle: {path}")
    return order


def _find_cycle(stuck: list[int], deps: list[set[int]]) -> list[int]:
    stuck_set = set(stuck)
    node = stuck[0]
    seen: dict[int, int] = {}
    path: list[int] = []
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = min(d for d in deps[node] if d in stuck_set)
    cycle = path[seen[node]:]
    return list(reversed(cycle[:4])) + ([cycle[-1]] if len(cycle) > 4 else [])


# ---- external data ---------------------------------------------------------------------------
def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]


def check_external_data(model: onnx.ModelProto, base_dir: str, where: str = "model") -> list[str]:
    """Refuse external data outside ``base_dir``; returns the data files the model reads."""
    root = os.path.realpath(base_dir)
    files: list[str] = []
    for tensor in external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        label = f"tensor '{tensor.name}'"
        if not location:
            raise OnnxLoadError(f"{where}: {label} is marked external but names no data file")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
            raise OnnxLoadError(f"{where}: {label} keeps its data at the absolute path '{location}'; external data "
                                "must be a relative path inside the model's folder")
        if ".." in re.split(r"[\\/]+", location):
            raise OnnxLoadError(f"{where}: {label} keeps its data at '{location}', outside the model's folder "
                                "('..' is not allowed in external data paths)")
        full = os.path.realpath(os.path.join(root, location))
        if os.path.commonpath([full, root]) != root:
            raise OnnxLoadError(f"{where}: {label} keeps its data at '{location}', which resolves outside the "
                                "model's folder (symbolic link?)")
        if not os.path.isfile(full):
            raise OnnxLoadError(f"{where}: external data file '{location}' for {label} is missing")
        size = os.path.getsize(full)
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else size - offset
        except ValueError:
            raise OnnxLoadError(f"{where}: {label} has a malformed external data offset or length") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise OnnxLoadError(f"{where}: external data for {label} is truncated ('{location}' has {size} bytes, "
                                f"the tensor needs bytes {offset}..{offset + length})")
        expected = tensor_byte_size(tensor)
        if expected is not None and length != expected:
            raise OnnxLoadError(f"{where}: external data for {label} is {length} bytes, its dims {list(tensor.dims)} "
                                f"need {expected}")
        if full not in files:
            files.append(full)
    return files


def load_external(model: onnx.ModelProto, base_dir: str, where: str = "model") -> None:
    if not external_tensors(model):
        return
    check_external_data(model, base_dir, where)
    from onnx.external_data_helper import load_external_data_for_model

    try:
        load_external_data_for_model(model, base_dir)
    except Exception as e:  # onnx raises ValidationError / OSError here
        raise OnnxLoadError(f"{where}: cannot load external data: {_first_line(e)}") from None


# =============================================================================================
# Conversion
# =============================================================================================
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
            proto = _copy(proto)
            load_external(proto, base_dir, where)
        default_name = proto.graph.name or "main"
    proto = densify_sparse_initializers(proto, where)
    return _Converter(proto, name or default_name or "main", where).run()


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


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
        reason = re.sub(r"^.*Assertion `.*?` failed: ", "", _first_line(e)).strip()
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
        return dtype, [self._dim(d, fresh=False) for d in tt.shape.dim]

    def scalar(self, value, dtype: torch.dtype) -> Value:
        return self.graph.add_constant(torch.tensor(value, dtype=dtype), "scalar")

    def tensor_const(self, tensor: torch.Tensor, base: str = "c") -> Value:
        return self.graph.add_constant(tensor, base)

    # ---- dims --------------------------------------------------------------------------------
    def _dim(self, d, fresh: bool):
        """``fresh``: a graph input's dim (unknown ones get a fresh symbol). Elsewhere an unknown dim,
        or a label shape inference made up for one (``unk__3``, numbered per run), is None."""
        if d.HasField("dim_value"):
            return int(d.dim_value)
        if d.HasField("dim_param") and d.dim_param and (fresh or not _INFERENCE_LABEL.fullmatch(d.dim_param)):
            return self._param(d.dim_param)
        return self._fresh() if fresh else None

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

    def _fresh(self):
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
        return TensorType(dtype, tuple(self._dim(d, fresh=True) for d in tt.shape.dim))

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
        self._remember(name, tensor)

    def _remember(self, name: str, tensor: torch.Tensor) -> None:
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
                        value = _as_object_array(value)
                        if value.size <= KNOWN_LIMIT:
                            self.known[name] = value
                if self._fold(node, outs):
                    return
        handler = HANDLERS.get(node.op_type) if domain == "" and not subgraph_free_names(node) else None
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
        self._opaque(node, index, domain, ins, reason)

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

    # ---- opaque nodes ------------------------------------------------------------------------
    def _opaque(self, node: onnx.NodeProto, index: int, domain: str, ins: list, reason: str) -> None:
        captures = tuple(sorted(subgraph_free_names(node)))
        capture_values = [self.env[c] for c in captures]
        present = [i for i, o in enumerate(node.output) if o]
        skip = tuple(i for i, o in enumerate(node.output) if not o and i < (present[-1] if present else -1))
        out_names = [node.output[i] for i in present]
        types = self._opaque_types(node, index, ins, captures, capture_values, out_names)
        opsets = {"": self.opsets.get("", MIN_OPSET)}
        if domain:
            opsets[domain] = self.opsets.get(domain, 1)
        functions = self._functions_for(node, domain, opsets)
        attrs = {"domain": domain, "op_type": node.op_type, "attributes": OnnxAttributes(node.attribute),
                 "opsets": tuple(sorted(opsets.items())), "out_types": tuple(types), "skip_outputs": skip,
                 "captures": captures, "functions": functions}
        inputs = list(ins) + capture_values
        ir_node = self.graph.create_node(OPAQUE, inputs, attrs, names=out_names,
                                         meta={"onnx_name": node.name, "source": node.name or node.op_type,
                                               "opaque_reason": reason})
        for name, value in zip(out_names, ir_node.outputs):
            self.env[name] = value

    def _functions_for(self, node, domain, opsets) -> tuple[bytes, ...]:
        found: list[onnx.FunctionProto] = []
        pending = [(domain, node.op_type)]
        seen = set()
        while pending:
            key = pending.pop()
            if key in seen or key not in self.functions:
                continue
            seen.add(key)
            f = self.functions[key]
            found.append(f)
            for imp in f.opset_import:
                opsets.setdefault("" if imp.domain in DEFAULT_DOMAINS else imp.domain, int(imp.version))
            for n in f.node:
                pending.append(("" if n.domain in DEFAULT_DOMAINS else n.domain, n.op_type))
        return tuple(f.SerializeToString(deterministic=True) for f in found)

    def _opaque_types(self, node, index, ins, captures, capture_values, out_names) -> list[TensorType]:
        probe = self._node_model(node, ins, captures, capture_values)
        local = self._infer_node(node, probe)
        if any(local.get(n, (None, None))[0] is None or local.get(n, (None, None))[1] is None for n in out_names):
            for name, (dtype, dims) in self._ort_infer_node(node, probe).items():
                ldtype, ldims = local.get(name, (None, None))
                local[name] = (ldtype or dtype, ldims if ldims is not None else dims)
        types = []
        for name in out_names:
            ldtype, ldims = local.get(name, (None, None))
            gdtype, gdims = self.onnx_type(name)
            dtype = ldtype or gdtype
            dims = ldims if ldims is not None else gdims if gdims is not None else _reduction_dims(node, ins)
            if dims is None:
                dims = _loop_dims(node, ins, list(node.output).index(name))
            if dtype is None or dims is None:
                what = "dtype" if dtype is None else "rank"
                raise OnnxLoadError(f"{self.where}: cannot tell the {what} of output '{name}' of "
                                    f"{node_label(node, index)}: neither onnx nor onnxruntime shape inference "
                                    "can (an op they do not know, or a result that depends on run-time values); "
                                    "add value_info for it to the model")
            merged = []
            for i, d in enumerate(dims):
                if d is None and gdims is not None and len(gdims) == len(dims):
                    d = gdims[i]
                merged.append(d if d is not None else self._fresh())
            types.append(TensorType(dtype, tuple(merged)))
        return types

    def _node_model(self, node, ins, captures, capture_values) -> onnx.ModelProto:
        """The node alone, its inputs typed with their IR types (symbolic dims as dim_params)."""
        graph_inputs, initializers, names = [], [], []
        for i, v in enumerate(ins):
            if v is None:
                names.append("")
                continue
            name = f"__in{i}"
            names.append(name)
            if v.is_constant and v.const.numel() <= 4096:
                initializers.append(_tensor_proto(v.const, name))
            else:
                graph_inputs.append(_value_info(name, v.type))
        for name, v in zip(captures, capture_values):  # a subgraph's Squeeze axes are often captured constants
            if v.is_constant and v.const.numel() <= 4096:
                initializers.append(_tensor_proto(v.const, name))
            else:
                graph_inputs.append(_value_info(name, v.type))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        del copy.input[:]
        copy.input.extend(names)
        outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o]
        g = helper.make_graph([copy], "node", graph_inputs, outputs, initializer=initializers)
        imports = [helper.make_opsetid(d, v) for d, v in sorted(self.opsets.items())]
        model = helper.make_model(g, opset_imports=imports, ir_version=max(
            helper.find_min_ir_version_for(imports, ignore_unknown=True), min(self.model.ir_version, 10)))
        model.functions.extend(self.functions[k] for k in sorted(self.functions))
        return model

    def _infer_node(self, node, model) -> dict[str, tuple]:
        """onnx shape inference of the node alone."""
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        except Exception:  # unknown op or an inference bug: other sources follow
            return {}
        found = {}
        for vi in list(inferred.graph.output) + list(inferred.graph.value_info):
            if vi.name in node.output and vi.type.HasField("tensor_type"):
                tt = vi.type.tensor_type
                dtype = ONNX_TO_TORCH.get(tt.elem_type) if tt.elem_type else None
                dims = [self._dim(d, fresh=False) for d in tt.shape.dim] if tt.HasField("shape") else None
                found[vi.name] = (dtype, dims)
        return found

    def _ort_infer_node(self, node, model) -> dict[str, tuple]:
        """onnxruntime's type inference of the node alone: it knows the com.microsoft contrib ops.

        onnxruntime reports both an unknown shape and a rank-0 one as ``[]``; such an output is
        probed again (``_ort_is_scalar``) and stays unknown unless it is provably a scalar."""
        session = _ort_session(model)
        if session is None:  # onnxruntime does not know the op either
            return {}
        found = {}
        for out in session.get_outputs():
            dtype = _ORT_TYPES.get(out.type)
            dims = None
            if isinstance(out.shape, list) and (out.shape or _ort_is_scalar(model, out.name, dtype)):
                dims = [d if isinstance(d, int) else self._param(d)
                        if isinstance(d, str) and d and not _INFERENCE_LABEL.fullmatch(d) else None for d in out.shape]
            found[out.name] = (dtype, dims)
        return found

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


def _reduction_dims(node: onnx.NodeProto, ins: list) -> list | None:
    """The rank of a Reduce* whose axes come at run time, which shape inference leaves unknown:
    the input's with ``keepdims`` (sizes unknown), else the input's less the number of axes."""
    if not node.op_type.startswith("Reduce") or node.domain not in DEFAULT_DOMAINS or not ins or ins[0] is None:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    rank = ins[0].type.rank
    axes = ins[1] if len(ins) > 1 else None
    if axes is None and "axes" not in attrs:
        return [None] * rank if attrs.get("keepdims", 1) or attrs.get("noop_with_empty_axes", 0) else []
    if attrs.get("keepdims", 1):
        return [None] * rank
    count = len(attrs["axes"]) if axes is None else axes.type.shape[0] if axes.type.rank == 1 else None
    if not isinstance(count, int) or count == 0:  # no axes reduces everything, or nothing (noop_with_empty_axes)
        return None
    return [None] * (rank - count)


def _loop_dims(node: onnx.NodeProto, ins: list, k: int) -> list | None:
    """The rank of a Loop's output ``k``, which shape inference leaves unknown for carried values (their
    sizes may change between iterations): a carried value keeps the rank that its initial value and the
    body's declared output agree on; a scan output has one more axis, the iterations. Sizes stay unknown."""
    if node.op_type != "Loop" or node.domain not in DEFAULT_DOMAINS:
        return None
    body = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "body"), None)
    if body is None or k + 1 >= len(body.output) or not body.output[k + 1].type.tensor_type.HasField("shape"):
        return None
    rank = len(body.output[k + 1].type.tensor_type.shape.dim)
    carried = len(node.input) - 2
    if k >= carried:
        return [None] * (rank + 1)
    initial = ins[2 + k] if 2 + k < len(ins) else None
    return [None] * rank if initial is not None and initial.type.rank == rank else None


def _ort_session(model: onnx.ModelProto, strict: bool = False):
    """An onnxruntime session of a probe model (None when onnxruntime refuses it); ``strict``: a
    declared output shape that contradicts the inferred one is an error instead of a warning."""
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4
        if strict:
            options.add_session_config_entry("session.strict_shape_type_inference", "1")
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own exception types
        return None


def _ort_is_scalar(model: onnx.ModelProto, output: str, dtype: torch.dtype | None) -> bool:
    """Whether onnxruntime infers rank 0 for ``output`` (it reports an unknown shape the same way):
    declared rank 0 must be accepted and declared rank 1 refused, under strict inference."""
    if dtype is None:
        return False

    def probe(rank: int) -> bool:
        declared = _copy(model)
        for vi in declared.graph.output:
            if vi.name == output:
                vi.type.CopyFrom(helper.make_tensor_type_proto(onnx_dtype(dtype), [None] * rank))
        return _ort_session(declared, strict=True) is not None

    return probe(0) and not probe(1)

_ORT_TYPES = {f"tensor({name})": dtype for name, dtype in [
    ("float", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16), ("double", torch.float64),
    ("int64", torch.int64), ("int32", torch.int32), ("int16", torch.int16), ("int8", torch.int8),
    ("uint8", torch.uint8), ("bool", torch.bool)]}

FOLDABLE = {"Shape", "Size", "Gather", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Slice", "Cast", "Add", "Sub",
            "Mul", "Div", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Max", "Min", "Not", "And",
            "Or", "Where", "Range", "ConstantOfShape", "Expand", "Identity", "ReduceProd", "ReduceSum"}


def _fits(entry: int, dtype: torch.dtype) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= int(entry) <= info.max


def _as_object_array(value) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.dtype == object:
        return value
    out = np.empty((), dtype=object) if not isinstance(value, np.ndarray) else np.empty(value.shape, dtype=object)
    if isinstance(value, np.ndarray):
        for idx, v in np.ndenumerate(value):
            out[idx] = v.item() if hasattr(v, "item") else v
    else:
        out[()] = value
    return out


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


def _tensor_proto(tensor: torch.Tensor, name: str) -> onnx.TensorProto:
    from graphopt.ir.onnx_common import tensor_to_proto

    return tensor_to_proto(tensor, name)


def _value_info(name: str, t: TensorType) -> onnx.ValueInfoProto:
    shape = [d if isinstance(d, int) else format_dim(d) for d in t.shape]
    return helper.make_tensor_value_info(name, onnx_dtype(t.dtype), shape)


__all__ = ["CONVERT_TO_OPSET", "MAX_OPSET", "MIN_OPSET", "OnnxLoadError", "OpsetConverted", "check_external_data", "check_model_structure", "from_onnx",
           "load_external", "load_model", "parse_model", "upgrade_opset"]
