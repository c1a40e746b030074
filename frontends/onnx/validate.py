"""Checks that an ONNX model is well formed, run before anything hands it to C++ (onnx shape
inference, ONNX Runtime) or allocates what the file declares.

A hostile or broken model must end in one ``OnnxLoadError`` line that names the tensor, value or
node, never in an abort inside onnx or memory sized by a number in the file:

* every tensor's data matches its dims and element type (raw, typed or external), with no
  ``segment`` field, no NUL byte in an external location, and an element count that fits in int64;
* dims are non-negative and ranks at most ``MAX_RANK``; a 1-D shape operand (``Reshape``'s shape,
  ``ConstantOfShape``'s input, ...) cannot declare more entries than a tensor can have dims;
* every string the frontend reads (op types, names, domains) is valid UTF-8;
* the ai.onnx opset is one graphopt reads (``MIN_OPSET`` to ``MAX_OPSET``; older ones are converted,
  see ``opset``), every value is defined once and before it is read, and the graph has no cycle.
"""
from __future__ import annotations

import heapq
import math

import onnx
from onnx import TensorProto

from graphopt.frontends import OnnxLoadError

MAX_RANK = 64                 # torch, numpy and ONNX Runtime hold at most this many dims
MAX_ELEMENTS = 2 ** 62        # element counts must fit in int64 with room for byte sizes
MIN_OPSET = 13
MAX_OPSET = onnx.defs.onnx_opset_version()
DEFAULT_DOMAINS = ("", "ai.onnx")


# ---- tensors, types and strings ------------------------------------------------------------
_ITEM_BITS = {TensorProto.FLOAT: 32, TensorProto.UINT8: 8, TensorProto.INT8: 8, TensorProto.UINT16: 16,
              TensorProto.INT16: 16, TensorProto.INT32: 32, TensorProto.INT64: 64, TensorProto.BOOL: 8,
              TensorProto.FLOAT16: 16, TensorProto.DOUBLE: 64, TensorProto.UINT32: 32, TensorProto.UINT64: 64,
              TensorProto.COMPLEX64: 64, TensorProto.COMPLEX128: 128, TensorProto.BFLOAT16: 16}
for _name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0"):
    if hasattr(TensorProto, _name):
        _ITEM_BITS[getattr(TensorProto, _name)] = 8
for _name in ("UINT4", "INT4", "FLOAT4E2M1"):
    if hasattr(TensorProto, _name):
        _ITEM_BITS[getattr(TensorProto, _name)] = 4
for _name in ("UINT2", "INT2"):
    if hasattr(TensorProto, _name):
        _ITEM_BITS[getattr(TensorProto, _name)] = 2

# the typed field a data type is stored in when raw_data is not used, and entries per element
_TYPED_FIELD = {TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
                TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
                TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1),
                TensorProto.UINT64: ("uint64_data", 1), TensorProto.STRING: ("string_data", 1)}

# ops that read a 1-D tensor as a list of dims or axes: (op type, input positions, entries allowed)
_SHAPE_OPERANDS = {"Reshape": ((1,), MAX_RANK), "Expand": ((1,), MAX_RANK), "ConstantOfShape": ((0,), MAX_RANK),
                   "Tile": ((1,), MAX_RANK), "Unsqueeze": ((1,), MAX_RANK), "Squeeze": ((1,), MAX_RANK),
                   "Slice": ((1, 2, 3, 4), MAX_RANK), "Pad": ((1,), 2 * MAX_RANK),
                   "Resize": ((1, 2, 3), 2 * MAX_RANK), "Upsample": ((1,), MAX_RANK)}


def tensor_byte_size(tensor: TensorProto) -> int | None:
    """Bytes of the tensor's data as raw_data (packed), or None for strings and unknown types."""
    bits = _ITEM_BITS.get(tensor.data_type)
    if bits is None:
        return None
    return (math.prod(tensor.dims) * bits + 7) // 8


def validate_model(model: onnx.ModelProto, where: str = "model") -> None:
    """Raise ``OnnxLoadError`` naming the first malformed tensor, value, string or node (see the module doc)."""
    _check_strings(model, where)
    declared: dict[str, list] = {}
    for graph, label in _graphs(model.graph, "graph"):
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            _check_type(vi.type, f"{where}: value '{vi.name}' ({label})")
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                declared.setdefault(vi.name, [d.dim_value if d.HasField("dim_value") else None
                                              for d in vi.type.tensor_type.shape.dim])
        for tensor in graph.initializer:
            _check_tensor(tensor, f"{where}: initializer '{tensor.name}'")
            declared[tensor.name] = list(tensor.dims)
        for sparse in graph.sparse_initializer:
            _check_sparse(sparse, f"{where}: sparse initializer '{sparse.values.name}'")
            declared[sparse.values.name] = list(sparse.dims)
        for i, node in enumerate(graph.node):
            node_where = node_label(node, i, label)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR or attr.HasField("t"):
                    _check_tensor(attr.t, f"{where}: attribute '{attr.name}' of {node_where}")
                for t in attr.tensors:
                    _check_tensor(t, f"{where}: attribute '{attr.name}' of {node_where}")
                if attr.HasField("sparse_tensor"):
                    _check_sparse(attr.sparse_tensor, f"{where}: attribute '{attr.name}' of {node_where}")
                for s in attr.sparse_tensors:
                    _check_sparse(s, f"{where}: attribute '{attr.name}' of {node_where}")
                if attr.HasField("tp"):
                    _check_type(attr.tp, f"{where}: attribute '{attr.name}' of {node_where}")
    for i, node in enumerate(model.graph.node):
        rule = _SHAPE_OPERANDS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            continue
        positions, limit = rule
        for p in positions:
            dims = declared.get(node.input[p]) if p < len(node.input) and node.input[p] else None
            if dims is not None and len(dims) == 1 and dims[0] is not None and dims[0] > limit:
                raise OnnxLoadError(f"{where}: {node_label(node, i)} reads '{node.input[p]}' as a list of "
                                    f"{dims[0]} dims or axes; a tensor has at most {MAX_RANK} dims")


def _graphs(graph: onnx.GraphProto, label: str):
    """The graph and every subgraph in it (If/Loop/Scan bodies), with a label naming where each is."""
    pending = [(graph, label)]
    while pending:
        g, where = pending.pop()
        yield g, where
        for i, node in enumerate(g.node):
            for attr in node.attribute:
                if attr.HasField("g"):
                    pending.append((attr.g, f"body '{attr.name}' of {node_label(node, i, where)}"))
                for k, sub in enumerate(attr.graphs):
                    pending.append((sub, f"body '{attr.name}'[{k}] of {node_label(node, i, where)}"))


def _check_strings(message, where: str) -> None:
    """protobuf hands back ``bytes`` for a string field that is not valid UTF-8: refuse it, naming the field."""
    pending = [(message, "model")]
    while pending:
        msg, path = pending.pop()
        for fd, value in msg.ListFields():
            repeated = fd.is_repeated
            if fd.type == fd.TYPE_STRING:
                for k, v in enumerate(value if repeated else [value]):
                    if not isinstance(v, str):
                        at = f"{path}.{fd.name}" + (f"[{k}]" if repeated else "")
                        raise OnnxLoadError(f"{where}: {at} is not valid UTF-8 text ({bytes(v)[:40]!r})")
            elif fd.type == fd.TYPE_MESSAGE:
                if repeated:
                    pending.extend((v, f"{path}.{fd.name}[{k}]") for k, v in enumerate(value))
                else:
                    pending.append((value, f"{path}.{fd.name}"))


def _check_type(type_proto: onnx.TypeProto, label: str) -> None:
    """Dims are non-negative and ranks bounded, in tensors and in sequences/maps/optionals of them."""
    pending = [type_proto]
    while pending:
        t = pending.pop()
        kind = t.WhichOneof("value")
        if kind in ("tensor_type", "sparse_tensor_type"):
            tt = getattr(t, kind)
            if tt.HasField("shape"):
                dims = tt.shape.dim
                if len(dims) > MAX_RANK:
                    raise OnnxLoadError(f"{label} has rank {len(dims)}; a tensor has at most {MAX_RANK} dims")
                for d in dims:
                    if d.HasField("dim_value") and d.dim_value < 0:
                        raise OnnxLoadError(f"{label} has a negative dim {d.dim_value} in its shape")
        elif kind == "sequence_type":
            pending.append(t.sequence_type.elem_type)
        elif kind == "optional_type":
            pending.append(t.optional_type.elem_type)
        elif kind == "map_type":
            pending.append(t.map_type.value_type)


def _check_dims(dims, label: str) -> int:
    if len(dims) > MAX_RANK:
        raise OnnxLoadError(f"{label} has rank {len(dims)}; a tensor has at most {MAX_RANK} dims")
    numel = 1
    for d in dims:
        if d < 0:
            raise OnnxLoadError(f"{label} has a negative dim {d} in its dims {list(dims)}")
        numel *= d
        if numel > MAX_ELEMENTS:
            raise OnnxLoadError(f"{label} has dims {list(dims)}: more elements than fit in int64")
    return numel


def _check_tensor(tensor: TensorProto, label: str) -> None:
    numel = _check_dims(tensor.dims, label)
    if tensor.HasField("segment"):
        raise OnnxLoadError(f"{label} uses the 'segment' field (a tensor split across messages); graphopt reads "
                            "whole tensors only")
    if tensor.data_type not in TensorProto.DataType.values() or tensor.data_type == TensorProto.UNDEFINED:
        raise OnnxLoadError(f"{label} has no valid element type (data_type {tensor.data_type})")
    if tensor.data_location == TensorProto.EXTERNAL:
        for entry in tensor.external_data:
            if "\0" in entry.key or "\0" in entry.value:
                raise OnnxLoadError(f"{label} has a NUL byte in its external data entry '{entry.key}'")
        return  # its size is checked against the data file before it is read
    expected = tensor_byte_size(tensor)
    if tensor.HasField("raw_data"):
        if expected is not None and len(tensor.raw_data) != expected:
            raise OnnxLoadError(f"{label} has {len(tensor.raw_data)} bytes of raw data, its dims {list(tensor.dims)} "
                                f"and type {onnx_type_name(tensor.data_type)} need {expected}")
        return
    field, per = _TYPED_FIELD.get(tensor.data_type, ("int32_data", 1))
    count = len(getattr(tensor, field))
    bits = _ITEM_BITS.get(tensor.data_type, 32)
    # packed sub-byte types (int4, ...) keep one byte per int32 entry; the others one element per entry
    want = (numel * bits + 7) // 8 if field == "int32_data" and bits < 8 else numel * per
    if count != want:
        raise OnnxLoadError(f"{label} has {count} entries in {field}, its dims {list(tensor.dims)} need {want}")


def _check_sparse(sparse: onnx.SparseTensorProto, label: str) -> None:
    numel = _check_dims(sparse.dims, label)
    _check_tensor(sparse.values, f"{label} (values)")
    _check_tensor(sparse.indices, f"{label} (indices)")
    values, indices = sparse.values, sparse.indices
    if len(values.dims) != 1:
        raise OnnxLoadError(f"{label}: values must be 1-D, they have dims {list(values.dims)}")
    nnz = values.dims[0]
    if indices.data_type != TensorProto.INT64:
        raise OnnxLoadError(f"{label}: indices must be int64")
    if list(indices.dims) not in ([nnz], [nnz, len(sparse.dims)]):
        raise OnnxLoadError(f"{label}: indices have dims {list(indices.dims)}; with {nnz} values they must be "
                            f"[{nnz}] or [{nnz}, {len(sparse.dims)}]")
    if nnz > numel:
        raise OnnxLoadError(f"{label}: {nnz} values for a tensor of {numel} elements")


def onnx_type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"element type {elem_type}"


# ---- graph structure ----------------------------------------------------------------------
def opsets_of(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if imp.domain in DEFAULT_DOMAINS else imp.domain): int(imp.version) for imp in model.opset_import}


def check_model_structure(model: onnx.ModelProto, where: str = "model") -> None:
    """Well-formed tensors, types and strings (``validate_model``), opset range, single
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


def node_label(node: onnx.NodeProto, index: int, graph_label: str = "graph") -> str:
    """``node 'name' (Op)`` or ``node #3 (domain::Op) in body 'then_branch' of ...``: what errors name."""
    op = f"{node.domain}::{node.op_type}" if node.domain and node.domain not in DEFAULT_DOMAINS else node.op_type
    name = f"node '{node.name}'" if node.name else f"node #{index}"
    inside = "" if graph_label == "graph" else f" in {graph_label}"
    return f"{name} ({op}){inside}"


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


__all__ = ["DEFAULT_DOMAINS", "MAX_OPSET", "MAX_RANK", "MIN_OPSET", "check_model_structure", "node_label",
           "onnx_type_name", "opsets_of", "subgraph_free_names", "tensor_byte_size", "topological_order",
           "validate_model"]
