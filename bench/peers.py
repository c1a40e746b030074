"""The CPU stacks a user would pick instead of graphopt, built from the same model and the same
calibration data as ours: OpenVINO fp32 / bf16 / int8 (NNCF post-training quantization) and ONNX
Runtime static int8 (QDQ, per-channel) beside its dynamic int8. Bench-only: the library never
imports OpenVINO or NNCF; install them with ``pip install -e '.[bench]'``.

Every builder returns a call ``feed -> first output as numpy`` where ``feed`` maps the model's input
names to numpy arrays, so all peers run on exactly the same inputs. OpenVINO is compiled with
``INFERENCE_NUM_THREADS=threads`` and ``PERFORMANCE_HINT=LATENCY``: the benchmark makes one
synchronous call per batch, and LATENCY gives that call one stream with every thread (THROUGHPUT
splits the threads into streams that only an asynchronous pipeline of several requests fills).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import numpy as np

Feed = dict[str, np.ndarray]
INSTALL = "pip install -e '.[bench]'   (or: pip install openvino nncf)"


def require(module: str):
    """Import a bench-only peer, or stop with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"bench peer needs {module!r}, which is not installed ({e}); install it with: {INSTALL}") from None


def openvino_runners(model, example: Feed, calibration: list[Feed], threads: int) -> dict[str, Callable[[Feed], np.ndarray]]:
    """OpenVINO fp32 (precision hint f32), bf16 (the CPU plugin's default where the CPU has bf16) and
    int8 (``nncf.quantize`` of the same converted model, transformer preset, on ``calibration``)."""
    ov, nncf = require("openvino"), require("nncf")
    import torch

    with torch.no_grad():
        converted = ov.convert_model(model, example_input={k: torch.from_numpy(v) for k, v in example.items()})
    quantized = nncf.quantize(converted, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=sum(len(next(iter(f.values()))) for f in calibration))
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    compiled = {"openvino_fp32": core.compile_model(converted, "CPU", config | {"INFERENCE_PRECISION_HINT": "f32"}),
                "openvino_bf16": core.compile_model(converted, "CPU", config | {"INFERENCE_PRECISION_HINT": "bf16"}),
                "openvino_int8": core.compile_model(quantized, "CPU", config)}
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        del compiled["openvino_bf16"]  # it would silently be fp32
    return {name: _openvino_call(c) for name, c in compiled.items()}


def _openvino_call(compiled):
    request = compiled.create_infer_request()
    names = [p.get_any_name() for p in compiled.inputs]

    def call(feed: Feed) -> np.ndarray:
        request.infer({n: feed[n] for n in names})
        return request.get_output_tensor(0).data.copy()
    call.precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))  # what the plugin runs non-int8 ops in
    return call


def ort_static_int8(fp32_path: str, calibration: list[Feed], threads: int) -> Callable[[Feed], np.ndarray]:
    """``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax) after
    ``quant_pre_process``, calibrated on ``calibration``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, out = fp32_path.replace(".onnx", ".pre.onnx"), fp32_path.replace(".onnx", ".qdq.onnx")
    quant_pre_process(fp32_path, pre)
    names = _ort_names(pre)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calibration)

        def get_next(self):
            feed = next(self.feeds, None)
            return None if feed is None else _by_position(feed, names)

    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return ort_call(out, threads)


def ort_call(path_or_model, threads: int) -> Callable[[Feed], np.ndarray]:
    """An ONNX Runtime session (graphopt's settings: all graph optimizations, ``threads`` intra-op) as a call."""
    from graphopt.backends.onnxruntime_backend import create_session

    session = create_session(path_or_model, threads=threads, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda feed: session.run(None, _by_position(feed, names))[0]


def ort_custom_ops_call(model, threads: int) -> Callable[[Feed], np.ndarray]:
    """Our integer model as ``opt-cli --ort-custom-ops`` writes it, in ONNX Runtime with graphopt's library."""
    from graphopt.backends.onnxruntime_backend import custom_ops_session

    session = custom_ops_session(model, threads=threads)
    names = [i.name for i in session.get_inputs()]
    return lambda feed: session.run(None, _by_position(feed, names))[0]


def _ort_names(path: str) -> list[str]:
    import onnx

    model = onnx.load(path, load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def _by_position(feed: Feed, names: list[str]) -> Feed:
    """``feed`` renamed to an ONNX model's input names (same names, else the same order)."""
    if all(n in feed for n in names):
        return {n: feed[n] for n in names}
    if len(feed) != len(names):
        raise ValueError(f"cannot match the inputs {list(feed)} to the ONNX inputs {names}")
    return dict(zip(names, feed.values()))


_scratch = None


def temp_path(name: str) -> str:
    """A path in this process's scratch folder, which is removed when the process exits (a DeiT-S
    run leaves about 200 MB of ONNX files there)."""
    import tempfile

    global _scratch
    if _scratch is None:
        _scratch = tempfile.TemporaryDirectory(prefix="graphopt-peers-")
    return os.path.join(_scratch.name, name)
