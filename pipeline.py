"""``graphopt.optimize``: capture, run the passes, lower to a backend."""
from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import torch

from graphopt.ir import Graph
from graphopt.ir.cost import graph_cost
from graphopt.passes import PassManager, Report
from graphopt.progress import showing, task


class OptimizedModel:
    """Called like the original model. ``.graph`` is the optimized IR, ``.report`` what each pass did,
    ``.executable`` what the backend made of the graph."""

    def __init__(self, graph: Graph, report: Report, backend: str, backend_options: dict | None = None):
        from graphopt.backends.registry import lower

        self.graph = graph
        self.report = report
        self.backend = backend
        with task(f"lowering to the {backend} backend"):
            self.executable = lower(graph, backend, **(backend_options or {}))

    def __call__(self, *args, **kwargs):
        check_inputs(self.graph, _flat_tensors(self.graph, args, kwargs), dtypes=False)
        with torch.no_grad():
            return self.executable(*args, **kwargs)

    def save(self, path: str) -> None:
        """``.onnx`` writes an ONNX model (when the ONNX backend is available); anything else the IR."""
        from graphopt.backends.registry import save
        save(self.graph, path)


def _with_progress(fn):
    """``progress=False`` (or ``GRAPHOPT_PROGRESS=0``) silences the progress display of ``fn``."""
    @functools.wraps(fn)
    def wrapper(*args, progress: bool | None = None, **kwargs):
        with showing(progress):
            return fn(*args, **kwargs)
    return wrapper


@_with_progress
def optimize(model, passes: Sequence = (), example_inputs: Any = None, *, backend: str = "torch",
             calibration: Any = None, check: bool = False, dynamic_batch: bool = True,
             dynamic_shapes=None, backend_options: dict | None = None) -> OptimizedModel:
    """Optimize ``model`` (a ``torch.nn.Module``, an IR ``Graph``, or an ONNX model: ``.onnx`` path or
    ``onnx.ModelProto``) with ``passes``.

    ``example_inputs``: a tuple of positional inputs, a dict of keyword inputs, or ``(args, kwargs)``.
    ``check=True`` compares every pass numerically with the graph before it on those inputs.
    ``progress=False`` turns off the progress display (also ``GRAPHOPT_PROGRESS=0``); off a terminal
    it is one line per step on stderr.
    """
    report = Report()
    args, kwargs = _split_inputs(example_inputs)
    if _is_onnx(model):
        from graphopt.frontends.onnx_frontend import from_onnx

        start = time.perf_counter()
        graph = from_onnx(model)
        report.capture_seconds = time.perf_counter() - start
    elif isinstance(model, Graph):
        graph = model
    elif isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise ValueError("optimize needs example_inputs to capture a torch model")
        from graphopt.frontends import from_torch

        start = time.perf_counter()
        with task("capturing the model (torch.export)"):
            graph = from_torch(model, args, kwargs, dynamic_batch=dynamic_batch, dynamic_shapes=dynamic_shapes)
        report.capture_seconds = time.perf_counter() - start
    else:
        raise TypeError(f"optimize takes a torch.nn.Module, a graphopt Graph, an .onnx path or an onnx.ModelProto, "
                        f"not {type(model).__name__}")
    flat = _flat_tensors(graph, args, kwargs) if example_inputs is not None else None
    if calibration is not None:
        calibration = calibration_batches(graph, calibration)
    with task("cost model of the graph before"):
        report.cost_before = graph_cost(graph)
    graph, report = PassManager(passes, example_inputs=flat, calibration=calibration, check=check).run(graph, report)
    with task("cost model of the graph after"):
        report.cost_after = graph_cost(graph)
    return OptimizedModel(graph, report, backend, backend_options)


def _is_onnx(model) -> bool:
    import os

    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model).lower().endswith(".onnx")
    return type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx")


def _split_inputs(example_inputs) -> tuple[tuple, dict]:
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], tuple)
            and isinstance(example_inputs[1], dict)):
        return example_inputs
    return tuple(example_inputs), {}


def calibration_batches(graph: Graph, calibration) -> list[tuple[torch.Tensor, ...]]:
    """Each calibration item (same forms as example_inputs) as flat tensors, one per graph input,
    checked against the graph's input types so a wrong shape or name fails here, clearly."""
    if isinstance(calibration, (torch.Tensor, dict)) or not hasattr(calibration, "__iter__"):
        raise TypeError("calibration must be a list of example inputs (tuples, dicts or (args, kwargs))")
    batches = []
    for i, item in enumerate(calibration):
        args, kwargs = _split_inputs(item)
        try:
            flat = _flat_tensors(graph, args, kwargs)
        except TypeError as e:
            raise ValueError(f"calibration item {i}: {e}") from None
        if len(flat) != len(graph.inputs):
            raise ValueError(f"calibration item {i} has {len(flat)} tensors; the graph takes {len(graph.inputs)}")
        try:
            check_inputs(graph, flat)
        except ValueError as e:
            raise ValueError(f"calibration item {i}: {e}") from None
        batches.append(flat)
    if not batches:
        raise ValueError("calibration is empty")
    return batches


def check_inputs(graph: Graph, flat: Sequence[torch.Tensor], *, dtypes: bool = True) -> None:
    """Each tensor against its graph input's rank, static dims (and one size per symbolic dim) and dtype, so
    a call at a batch the graph was not captured for fails here, naming the input, not deep in a reshape."""
    sizes: dict = {}
    for value, tensor in zip(graph.inputs, flat):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"input %{value.name} is a {type(tensor).__name__}, the graph expects {value.type}")
        t = value.type
        given = f"input %{value.name} is {tuple(tensor.shape)} {tensor.dtype}"
        if tensor.dim() != t.rank or (dtypes and tensor.dtype != t.dtype):
            raise ValueError(f"{given}, the graph expects {t}")
        for axis, (d, n) in enumerate(zip(t.shape, tensor.shape)):
            if isinstance(d, int) and d != n:
                hint = (" (the model was captured with a static batch; capture with dynamic_batch=True to run "
                        "at any batch)") if axis == 0 else ""
                raise ValueError(f"{given}, the graph expects {t}: axis {axis} must be {d}{hint}")
            if not isinstance(d, int) and sizes.setdefault(d, (n, value.name))[0] != n:
                raise ValueError(f"{given}, the graph expects {t}: axis {axis} ({d}) is {sizes[d][0]} in "
                                 f"%{sizes[d][1]}")


def _flat_tensors(graph: Graph, args, kwargs) -> tuple[torch.Tensor, ...]:
    from graphopt.backends.torch_backend import bind_by_name, flatten_inputs

    if graph.meta.get("in_spec") is None:
        return tuple(bind_by_name([v.name for v in graph.inputs], args, kwargs))

    flat = flatten_inputs(graph.meta["in_spec"], args, kwargs)
    return tuple(flat[i] for i, slot in enumerate(graph.meta["user_inputs"]) if slot is not None)
