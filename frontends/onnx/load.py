"""Reading an ONNX model safely: bounded reads of regular files only, parsing, external data kept
inside the model's folder, and sparse initializers made dense.

* only regular files are read (a FIFO would block, ``/dev/zero`` never ends), up to protobuf's 2 GB;
* a file that is not ONNX or is truncated raises ``OnnxLoadError`` with a one-line message;
* the parsed model is checked (``validate.check_model_structure``) before anything else reads it;
* external data files must sit inside the model's folder (symlinks are resolved) and match the
  sizes their tensors declare;
* sparse initializers become dense ones (ONNX Runtime runs them; the IR holds dense constants).
"""
from __future__ import annotations

import math
import os
import re
import stat

import numpy as np
import onnx
from onnx import TensorProto

from graphopt.frontends import OnnxLoadError
from graphopt.frontends.onnx.validate import check_model_structure, tensor_byte_size

MAX_FILE_BYTES = 2 ** 31 - 1  # protobuf cannot parse a larger message


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


# ---- parsing ---------------------------------------------------------------------------------
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
                                f"{first_line(e)})") from None
        raise OnnxLoadError(f"{where}: not an ONNX model (protobuf cannot parse it)") from None
    if not model.HasField("graph") or model.ir_version <= 0 or (not model.opset_import and not model.graph.node):
        raise OnnxLoadError(f"{where}: not an ONNX model (no graph, IR version or opset imports)")
    check_model_structure(model, where)
    return model


def _looks_like_onnx_prefix(data: bytes) -> bool:
    """ONNX files start with field 1 (ir_version, varint): byte 0x08 then a small version number."""
    return len(data) >= 2 and data[0] == 0x08 and 1 <= data[1] <= 64


def first_line(error: BaseException) -> str:
    """The first line of an exception's text (errors here are one line)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


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
        raise OnnxLoadError(f"{where}: cannot load external data: {first_line(e)}") from None


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
    out = copy_model(model)
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


__all__ = ["MAX_FILE_BYTES", "check_external_data", "copy_model", "densify", "densify_sparse_initializers", "diagnose",
           "external_tensors", "first_line", "load_external", "load_model", "parse_model", "read_model_bytes"]
