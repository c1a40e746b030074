"""The input model: MODEL.onnx read (its external data checked) and converted to the IR, or the
built-in example; what each side of the comparison holds (op counts, parameters, sizes)."""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

from graphopt.cli import EXIT_FAILED, CliError
from graphopt.cli.outputs import sha256_file
from graphopt.progress import task


@dataclass
class ModelSide:
    """One side of the comparison (input or output model)."""
    proto: object = None
    path: str | None = None
    ops: dict = field(default_factory=dict)
    parameters: int = 0
    weight_bytes: int = 0
    file_bytes: int | None = None
    sha256: str | None = None
    data_files: list = field(default_factory=list)
    example: dict | None = None  # inputs that come with the model (the demo's)


def load(args):
    """(the input side, its graph, where it came from): MODEL.onnx read and converted, or the demo."""
    from graphopt.frontends.onnx import check_external_data, from_onnx, load_external, load_model
    from graphopt.frontends import FrontendError

    if args.demo:
        return _load_demo()
    path = args.model
    with task(f"reading {path}", key="read"):
        proto = load_model(path, load_external_data=False)
        base = os.path.dirname(os.path.abspath(path))
        data_files = check_external_data(proto, base, path)
        load_external(proto, base, path)
    before = describe(proto)
    before.path = os.path.abspath(path)
    before.data_files = data_files
    before.file_bytes = os.path.getsize(path) + sum(os.path.getsize(p) for p in data_files)
    before.sha256 = sha256_file(path)
    with task("converting to the IR", key="convert"):
        try:
            graph = from_onnx(proto, name=os.path.splitext(os.path.basename(path))[0])
        except FrontendError:
            raise
        except Exception as e:  # a model onnx's own checker refuses is malformed input, not our bug
            from graphopt.frontends.onnx.load import diagnose

            problem = diagnose(proto)
            if problem is None:
                raise
            raise CliError(f"{path}: malformed model: {problem}") from e
    return before, graph, path


def _load_demo():
    try:
        from graphopt.zoo import tiny_vit
    except ImportError as e:
        raise CliError(f"--demo needs graphopt.zoo.tiny_vit, which is not available: {e}", EXIT_FAILED) from None
    from graphopt.backends.onnx_lowering import to_onnx
    from graphopt.frontends import from_torch

    from graphopt.pipeline import _flat_tensors

    with task("capturing the built-in example (tiny ViT)", key="capture"):
        case = tiny_vit()
        graph = from_torch(case.model, tuple(case.args), dict(case.kwargs))
        proto = to_onnx(graph)
    before = describe(proto)
    before.file_bytes = proto.ByteSize()
    # the example's own inputs are the default inputs of --check and the passes
    flat = _flat_tensors(graph, tuple(case.args), dict(case.kwargs))
    before.example = {v.name: t.numpy() for v, t in zip(graph.inputs, flat)}
    return before, graph, "demo: graphopt.zoo.tiny_vit()"


_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2}


def describe(proto) -> ModelSide:
    """Op counts, parameters and weight bytes of an ONNX model."""
    ops = Counter()
    for n in proto.graph.node:
        ops[f"{n.domain}::{n.op_type}" if n.domain and n.domain != "ai.onnx" else n.op_type] += 1
    params = weight = 0
    for t in proto.graph.initializer:
        numel = math.prod(t.dims) if len(t.dims) else 1
        params += numel
        weight += numel * _ITEMSIZE.get(t.data_type, 1)
    return ModelSide(proto=proto, ops=dict(sorted(ops.items())), parameters=params, weight_bytes=weight)
