"""ONNX Runtime backend: IR -> ONNX model -> ``onnxruntime.InferenceSession``.

``lower(graph, "onnxruntime", threads=2, optimization_level="all", providers=None)`` returns a
callable taking the model's inputs (positional tensors or keyword names; torch or numpy) and
returning torch tensors, in the original output structure when the graph came from PyTorch.
Providers default to CUDA when this onnxruntime build has it, then CPU. ``.onnx`` paths given to
``OptimizedModel.save`` are written by ``save_onnx`` (atomically: temp file + rename).
``custom_ops_session(path)`` opens a model written with graphopt's cpu_integer custom ops (opt-cli
--ort-custom-ops) with their library registered.
"""
from __future__ import annotations

import os
import tempfile
import onnx
import torch
import torch.utils._pytree as pytree

from graphopt.backends import LoweringError
from graphopt.backends.onnx import DEFAULT_OPSET, register_aten_lowering, register_lowering, to_onnx  # noqa: F401
from graphopt.backends.registry import register_backend, register_saver
from graphopt.backends.torch_backend import bind_by_name, flatten_inputs
from graphopt.ir.files import atomic_write, plain_mode
from graphopt.ir import Graph
from graphopt.ir.onnx_common import to_numpy

OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                       "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "dml": "DmlExecutionProvider",
                    "coreml": "CoreMLExecutionProvider", "openvino": "OpenVINOExecutionProvider"}
PROTOBUF_LIMIT = 2 ** 31 - 1
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights above which .onnx files keep them in a side file


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def resolve_providers(providers) -> list:
    """None -> CUDA (when present) then CPU; names may be short ('cpu', 'cuda') or full."""
    import onnxruntime as ort

    if providers is None:
        return default_providers()
    if isinstance(providers, str):
        providers = [providers]
    available = ort.get_available_providers()
    out = []
    for p in providers:
        name, options = (p if isinstance(p, tuple) else (p, None))
        name = PROVIDER_ALIASES.get(str(name).lower(), name)
        if name not in available:
            raise ValueError(f"execution provider {name!r} is not available in this onnxruntime build "
                             f"(available: {', '.join(available)})")
        out.append((name, options) if options else name)
    return out


def session_options(threads: int | None = None, optimization_level: str = "all", inter_op_threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0 lets onnxruntime choose), got {threads}")
        options.intra_op_num_threads = int(threads)
    if inter_op_threads is not None:
        options.inter_op_num_threads = int(inter_op_threads)
    level = str(optimization_level).lower()
    if level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization_level must be one of {list(OPTIMIZATION_LEVELS)}, got {optimization_level!r}")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[level])
    options.log_severity_level = 3
    return options


def create_session(model: onnx.ModelProto | bytes | str, *, threads: int | None = None,
                   optimization_level: str = "all", providers=None, inter_op_threads: int | None = None):
    """An InferenceSession for a ModelProto, serialized bytes or a path, with the usual options."""
    import onnxruntime as ort

    options = session_options(threads, optimization_level, inter_op_threads)
    providers = resolve_providers(providers)
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() > PROTOBUF_LIMIT:
            return _session_via_files(model, options, providers)
        model = model.SerializeToString()
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as e:  # onnxruntime's own exception types; keep the first line, it names the problem
        text = str(e).strip()
        raise LoweringError(f"onnxruntime cannot load the model: {text.splitlines()[0] if text else type(e).__name__}") from e


def _session_via_files(model, options, providers):
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(path, options, providers=providers)


def custom_ops_session(model, *, threads: int | None = None, optimization_level: str = "all"):
    """An InferenceSession for a model with graphopt's cpu_integer custom ops (``opt-cli --ort-custom-ops``,
    ``to_onnx_custom_ops``): their library is built if needed and registered (``ort_custom_ops.session``)."""
    from graphopt.backends import ort_custom_ops

    return ort_custom_ops.session(model, threads=threads, optimization_level=optimization_level)


class OnnxRuntimeExecutable:
    """Called like the source model; ``.model`` is the ONNX ModelProto, ``.session`` the ORT session."""

    def __init__(self, graph: Graph, *, threads: int | None = None, optimization_level: str = "all",
                 providers=None, inter_op_threads: int | None = None, opset: int | None = None):
        self.model = to_onnx(graph, opset=opset)
        self.session = create_session(self.model, threads=threads, optimization_level=optimization_level,
                                      providers=providers, inter_op_threads=inter_op_threads)
        self.input_names = [i.name for i in self.model.graph.input]
        self.output_names = [o.name for o in self.model.graph.output]
        self._in_spec = graph.meta.get("in_spec")
        self._out_spec = graph.meta.get("out_spec")
        self._user_inputs = graph.meta.get("user_inputs")
        self._layout = graph.meta.get("output_layout")

    def run_flat(self, *tensors) -> tuple[torch.Tensor, ...]:
        if len(tensors) != len(self.input_names):
            raise TypeError(f"the model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                            f"got {len(tensors)}")
        feeds = {name: to_numpy(t) for name, t in zip(self.input_names, tensors)}
        results = self.session.run(None, feeds)
        return tuple(torch.from_numpy(r) for r in results)

    def __call__(self, *args, **kwargs):
        if self._in_spec is not None:
            flat = flatten_inputs(self._in_spec, args, kwargs)
            tensors = [flat[i] for i, slot in enumerate(self._user_inputs) if slot is not None]
            outputs = self.run_flat(*tensors)
            leaves = [outputs[slot] if isinstance(slot, int) else slot[1] for slot in self._layout]
            return pytree.tree_unflatten(leaves, self._out_spec)
        return self.run_flat(*bind_by_name(self.input_names, args, kwargs))

    def save(self, path: str) -> None:
        write_model(self.model, path)


register_backend("onnxruntime")(OnnxRuntimeExecutable)     # lower() checks the options against its __init__


@register_saver(".onnx")
def save_onnx(graph: Graph, path: str, *, opset: int | None = None, external_data: bool | None = None) -> None:
    write_model(to_onnx(graph, opset=opset), path, external_data=external_data)


def model_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def write_model(model: onnx.ModelProto, path: str, *, external_data: bool | None = None) -> list[str]:
    """Write atomically (temp file in the same folder, then rename). Weights go to ``<file>.data`` next
    to it when ``external_data`` is True, or when None and they would pass protobuf's 2 GB limit.
    Returns the paths written."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if external_data is None:
        external_data = weights > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        atomic_write(path, model_bytes(model))
        return [path]
    data_name = os.path.basename(path) + ".data"
    staged = onnx.ModelProto()
    staged.CopyFrom(model)
    fd, tmp_data = tempfile.mkstemp(dir=directory, prefix=".graphopt-", suffix=".data.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            offset = 0
            for tensor in staged.graph.initializer:
                raw = tensor.raw_data
                if len(raw) < 1024:
                    continue
                pad = (-offset) % 4096
                f.write(b"\0" * pad)
                offset += pad
                f.write(raw)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                offset += len(raw)
        plain_mode(tmp_data)
        atomic_write(path, model_bytes(staged), before_rename=lambda: os.replace(tmp_data, os.path.join(directory, data_name)))
    finally:
        if os.path.exists(tmp_data):
            os.unlink(tmp_data)
    return [path, os.path.join(directory, data_name)]


__all__ = ["DEFAULT_OPSET", "OnnxRuntimeExecutable", "create_session", "custom_ops_session", "default_providers", "model_bytes",
           "register_aten_lowering", "register_lowering", "resolve_providers", "save_onnx", "session_options",
           "to_onnx", "write_model"]
