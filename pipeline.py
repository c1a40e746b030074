"""``graphopt.optimize``: capture, run the passes, lower to a backend."""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from graphopt.ir import Graph
from graphopt.ir.cost import graph_cost
from graphopt.passes import PassManager, Report


class OptimizedModel(torch.nn.Module):
    """Called like the original model (a ``torch.nn.Module``, so it drops into code that expects one).
    ``.graph`` is the optimized IR, ``.report`` what each pass did, ``.executable`` what the backend
    made of the graph. It is for inference: it holds no parameters (the weights are constants of the
    graph, run by the backend), so ``.parameters()`` is empty and ``.to()``/``.half()`` change nothing;
    ``forward`` runs without autograd."""

    def __init__(self, graph: Graph, report: Report, backend: str, backend_options: dict | None = None):
        from graphopt.backends.registry import lower

        super().__init__()
        self.graph = graph
        self.report = report
        self.backend = backend
        self.__dict__["executable"] = lower(graph, backend, **(backend_options or {}))  # not a submodule: no parameters
        self.eval()

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.executable(*args, **kwargs)

    def save(self, path: str) -> None:
        """``.onnx`` writes an ONNX model (when the ONNX backend is available); anything else the IR."""
        import os

        from graphopt.backends.registry import save

        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot save {os.fspath(path)!r}: folder {folder!r} does not exist; create it first")
        save(self.graph, path)


def optimize(model, passes: Sequence = (), example_inputs: Any = None, *, backend: str = "torch",
             calibration: Any = None, check: bool = False, dynamic_batch: bool = True,
             dynamic_shapes=None, backend_options: dict | None = None) -> OptimizedModel:
    """Optimize ``model`` (a ``torch.nn.Module``, an IR ``Graph``, or an ONNX model: ``.onnx`` path or
    ``onnx.ModelProto``) with ``passes``.

    ``example_inputs``: a tuple of positional inputs, a dict of keyword inputs, or ``(args, kwargs)``.
    ``check=True`` compares every pass numerically with the graph before it on those inputs.
    """
    if isinstance(passes, str):  # one pass ("cse" or "low_rank:ratio=0.5"), not its letters
        passes = [passes]
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
        graph = from_torch(model, args, kwargs, dynamic_batch=dynamic_batch, dynamic_shapes=dynamic_shapes)
        report.capture_seconds = time.perf_counter() - start
    else:
        raise TypeError(_not_a_model(model))
    flat = _flat_tensors(graph, args, kwargs) if example_inputs is not None else None
    if calibration is not None:
        calibration = calibration_batches(graph, calibration)
    report.cost_before = graph_cost(graph)
    graph, report = PassManager(passes, example_inputs=flat, calibration=calibration, check=check).run(graph, report)
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
        for value, tensor in zip(graph.inputs, flat):
            static = [(a, d) for a, d in enumerate(value.type.shape) if isinstance(d, int)]
            if tensor.dtype != value.type.dtype or tensor.dim() != value.type.rank or any(tensor.shape[a] != d for a, d in static):
                raise ValueError(f"calibration item {i}: input %{value.name} is {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"the graph expects {value.type}")
        batches.append(flat)
    if not batches:
        raise ValueError("calibration is empty")
    return batches


def _flat_tensors(graph: Graph, args, kwargs) -> tuple[torch.Tensor, ...]:
    from graphopt.backends.torch_backend import bind_by_name, flatten_inputs

    if graph.meta.get("in_spec") is None:
        return tuple(bind_by_name([v.name for v in graph.inputs], args, kwargs))

    _check_structure(graph.meta["in_spec"], args, kwargs)
    flat = flatten_inputs(graph.meta["in_spec"], args, kwargs)
    return tuple(flat[i] for i, slot in enumerate(graph.meta["user_inputs"]) if slot is not None)


def _check_structure(in_spec, args, kwargs) -> None:
    """Name the positional count and keyword names the capture expects, not a TreeSpec dump."""
    if in_spec.num_children != 2:
        return
    positional, keywords = in_spec.child(0).num_children, list(in_spec.child(1).context or [])
    if len(args) != positional or sorted(kwargs) != sorted(keywords):
        def describe(n, keys):
            return f"{n} positional input(s) and keywords {sorted(keys)}" if keys else f"{n} positional input(s)"
        raise TypeError(f"the model was captured with {describe(positional, keywords)}, got "
                        f"{describe(len(args), list(kwargs))}; give inputs the way example_inputs were given")


def _not_a_model(model) -> str:
    import os

    if isinstance(model, (str, os.PathLike)):
        return (f"optimize got the path {os.fspath(model)!r}: a path must name an .onnx file; load a torch model "
                "yourself and pass the module, and load a saved graphopt IR file with graphopt.load_graph(path)")
    return (f"optimize takes a torch.nn.Module, a graphopt Graph, an .onnx path or an onnx.ModelProto, "
            f"not {type(model).__name__}")
