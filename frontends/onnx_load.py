"""Reading an ONNX file safely: bounded reads, and checks that run before anything hands the model to
C++ (onnx shape inference, ONNX Runtime) or allocates what the file declares.

A hostile or broken file must end in one ``OnnxLoadError`` line that names the tensor, value or
node, never in an abort inside onnx, an unbounded read, or memory sized by a number in the file:

* only regular files are read (a FIFO would block, ``/dev/zero`` never ends), up to protobuf's 2 GB;
* every tensor's data matches its dims and element type (raw, typed or external), with no
  ``segment`` field, no NUL byte in an external location, and an element count that fits in int64;
* dims are non-negative and ranks at most ``MAX_RANK``; a 1-D shape operand (``Reshape``'s shape,
  ``ConstantOfShape``'s input, ...) cannot declare more entries than a tensor can have dims;
* every string the frontend reads (op types, names, domains) is valid UTF-8;
* sparse initializers become dense ones (ONNX Runtime runs them; the IR holds dense constants).
"""
from __future__ import annotations

import math
import os
import stat

import numpy as np
import onnx
from onnx import TensorProto

from graphopt.frontends import FrontendError

MAX_FILE_BYTES = 2 ** 31 - 1  # protobuf cannot parse a larger message
MAX_RANK = 64                 # torch, numpy and ONNX Runtime hold at most this many dims
MAX_ELEMENTS = 2 ** 62        # element counts must fit in int64 with room for byte sizes


class OnnxLoadError(FrontendError):
    """The file is not a usable ONNX model; the message is one line naming the problem."""


# ---- reading ---------------------------------------------------------------------------------
def read_model_bytes(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The file's bytes: a regular file only, and never more than ``limit`` of them."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise OnnxLoadError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise OnnxLoadError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISDIR(info.st_mode):
        raise OnnxLoadError(f"{path}: is a directory, not an ONNX file")
    if not stat.S_ISREG(info.st_mode):
        raise OnnxLoadError(f"{path}: is not a regular file (a device, pipe or socket); give the path of an "
                            ".onnx file")
    if info.st_size > limit:
        raise OnnxLoadError(f"{path}: is {info.st_size} bytes, more than the {limit} an ONNX protobuf can hold")
    try:
        # O_NONBLOCK: should the path become a FIFO after the stat, opening it does not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise OnnxLoadError(f"{path}: is not a regular file")
            data = f.read(limit + 1)
    except OSError as e:
        raise OnnxLoadError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > limit:
        raise OnnxLoadError(f"{path}: is more than {limit} bytes, more than an ONNX protobuf can hold")
    return data


# ---- validation ------------------------------------------------------------------------------
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
            label = _node_label(node, i, label)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR or attr.HasField("t"):
                    _check_tensor(attr.t, f"{where}: attribute '{attr.name}' of {label}")
                for t in attr.tensors:
                    _check_tensor(t, f"{where}: attribute '{attr.name}' of {label}")
                if attr.HasField("sparse_tensor"):
                    _check_sparse(attr.sparse_tensor, f"{where}: attribute '{attr.name}' of {label}")
                for s in attr.sparse_tensors:
                    _check_sparse(s, f"{where}: attribute '{attr.name}' of {label}")
                if attr.HasField("tp"):
                    _check_type(attr.tp, f"{where}: attribute '{attr.name}' of {label}")
    for i, node in enumerate(model.graph.node):
        rule = _SHAPE_OPERANDS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            continue
        positions, limit = rule
        for p in positions:
            dims = declared.get(node.input[p]) if p < len(node.input) and node.input[p] else None
            if dims is not None and len(dims) == 1 and dims[0] is not None and dims[0] > limit:
                raise OnnxLoadError(f"{where}: {_node_label(node, i, 'graph')} reads '{node.input[p]}' as a list of "
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
                    pending.append((attr.g, f"body '{attr.name}' of {_node_label(node, i, where)}"))
                for k, sub in enumerate(attr.graphs):
                    pending.append((sub, f"body '{attr.name}'[{k}] of {_node_label(node, i, where)}"))


def _node_label(node: onnx.NodeProto, index: int, graph_label: str) -> str:
    name = f"node '{node.name}'" if node.name else f"node #{index}"
    inside = "" if graph_label == "graph" else f" in {graph_label}"
    return f"{name} ({node.op_type}){inside}"


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


# ---- sparse initializers ---------------------------------------------------------------------
def densify(sparse: onnx.SparseTensorProto, label: str) -> TensorProto:
    """A sparse initializer as the dense initializer it stands for (indices checked)."""
    values = onnx.numpy_helper.to_array(sparse.values).reshape(-1)
    indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    numel = math.prod(shape)
    if indices.ndim == 2:
        if indices.size and ((indices < 0).any() or (indices >= np.array(shape)).any()):
            raise OnnxLoadError(f"{label}: an index is outside the dims {list(shape)}")
        flat = np.ravel_multi_index(tuple(indices.T), shape) if indices.size else indices.reshape(-1)
    else:
        flat = indices.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= numel):
            raise OnnxLoadError(f"{label}: an index is outside the {numel} elements of dims {list(shape)}")
    if len(np.unique(flat)) != len(flat):
        raise OnnxLoadError(f"{label}: an index appears twice")
    dense = np.zeros(numel, dtype=values.dtype)
    dense[flat] = values
    return onnx.numpy_helper.from_array(dense.reshape(shape), sparse.values.name)


def densify_sparse_initializers(model: onnx.ModelProto, where: str = "model") -> onnx.ModelProto:
    """The model with its top-level sparse initializers as dense ones (a copy when there are any)."""
    graph = model.graph
    if not len(graph.sparse_initializer):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dense = [densify(s, f"{where}: sparse initializer '{s.values.name}'") for s in out.graph.sparse_initializer]
    del out.graph.sparse_initializer[:]
    out.graph.initializer.extend(dense)
    return out


def diagnose(model: onnx.ModelProto) -> str | None:
    """What onnx's own full checker (strict shape inference included) finds wrong with a model, or None.

    Used after the conversion failed unexpectedly: a model the checker refuses is malformed input."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx's ValidationError, InferenceError and friends
        text = " ".join(str(e).split())
        return text[:400] or type(e).__name__
    return None


__all__ = ["MAX_FILE_BYTES", "MAX_RANK", "OnnxLoadError", "densify", "densify_sparse_initializers", "diagnose",
           "read_model_bytes", "tensor_byte_size", "validate_model"]
