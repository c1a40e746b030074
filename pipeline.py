"""``graphopt.optimize``: capture, run the passes, lower to a backend."""
from __future__ import annotations

import functools
import inspect
import os
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from graphopt.ir import Graph
from graphopt.ir.cost import graph_cost
from graphopt.ir.index_inputs import index_bound
from graphopt.passes import PassManager, Report
from graphopt.progress import showing, task


class OptimizedModel(torch.nn.Module):
    """Called like the original model (a ``torch.nn.Module``, so it drops into code that expects one).
    ``.graph`` is the optimized IR, ``.report`` what each pass did, ``.executable`` what the backend
    made of the graph. It is for inference: it holds no parameters (the weights are constants of the
    graph, run by the backend), so ``.parameters()`` is empty and ``.to()``/``.half()`` change nothing;
    ``forward`` runs without autograd."""

    def __init__(self, graph: Graph, report: Report, backend: str, backend_options: dict | None = None, *,
                 source: str | None = None):
        from graphopt.backends.registry import lower

        super().__init__()
        self.graph = graph
        self.report = report
        self.backend = backend
        self.source = source      # the ONNX file the model was read from, which save() never writes over
        with task(f"lowering to the {backend} backend"):
            self.__dict__["executable"] = lower(graph, backend, **(backend_options or {}))  # not a submodule: no parameters
        self.eval()

    def forward(self, *args, **kwargs):
        args, kwargs = pytree.tree_map(_numpy_as_tensor, (args, kwargs))
        casts = _same_kind_casts(self.graph, _flat_tensors(self.graph, args, kwargs))
        if casts:
            args, kwargs = pytree.tree_map(lambda x: casts.get(id(x), x), (args, kwargs))
        check_inputs(self.graph, _flat_tensors(self.graph, args, kwargs))
        with torch.no_grad():
            return self.executable(*args, **kwargs)

    def save(self, path: str) -> None:
        """``.onnx`` writes an ONNX model (when the ONNX backend is available); anything else the IR."""
        from graphopt.backends.registry import save

        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot save {os.fspath(path)!r}: folder {folder!r} does not exist; create it first")
        sources = self._source_files()
        for target in (os.fspath(path), os.fspath(path) + ".data"):       # .data: an ONNX file's weights, if large
            read = next((f for f in sources if os.path.exists(target) and os.path.samefile(target, f)), None)
            if read is not None:
                what = "the ONNX file" if read == self.source else f"a weights file ({read}) of the ONNX file"
                raise FileExistsError(f"cannot save {os.fspath(path)!r}: {target!r} is {what} this model was read "
                                      "from, which graphopt never writes over; save to another path")
        save(self.graph, path)

    def _source_files(self) -> list[str]:
        """The ONNX file the model was read from and the external data files it reads."""
        if self.source is None or not os.path.exists(self.source):
            return []
        from graphopt.frontends.onnx import check_external_data, load_model

        proto = load_model(self.source, load_external_data=False)
        return [self.source] + check_external_data(proto, os.path.dirname(self.source), self.source)


def _numpy_as_tensor(x):
    """Every backend takes numpy arrays as the tensors they hold (no copy)."""
    return torch.from_numpy(x) if isinstance(x, np.ndarray) and x.dtype != object else x


_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _same_kind_casts(graph: Graph, flat) -> dict[int, torch.Tensor]:
    """id(input) -> the input cast to its graph input's dtype, for a float given to a float input (f64 images
    to an f32 model), and an integer or bool given to an integer input whose range holds it (int32 token ids,
    a bool attention mask, to int64); any other dtype is left to check_inputs, which names the input and the
    dtype it expects."""
    casts = {}
    for value, tensor in zip(graph.inputs, flat):
        want = value.type.dtype
        if not isinstance(tensor, torch.Tensor) or tensor.dtype == want:
            continue
        if tensor.is_floating_point() and want.is_floating_point:
            casts[id(tensor)] = tensor.to(want)
        elif want in _INTEGERS and (tensor.dtype is torch.bool or tensor.dtype in _INTEGERS and (not tensor.numel() or (
                torch.iinfo(want).min <= int(tensor.min()) and int(tensor.max()) <= torch.iinfo(want).max))):
            casts[id(tensor)] = tensor.to(want)
    return casts


def _cast_to_graph(graph: Graph, flat) -> tuple:
    casts = _same_kind_casts(graph, flat)
    return tuple(casts.get(id(t), t) for t in flat)


def _with_progress(fn):
    """``progress=False`` (or ``GRAPHOPT_PROGRESS=0``) silences the progress display of ``fn``."""
    @functools.wraps(fn)
    def wrapper(*args, progress: bool | None = None, **kwargs):
        with showing(progress):
            return fn(*args, **kwargs)
    sig = inspect.signature(fn)      # wraps() copies fn's signature, which lacks progress: help() would not show it
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation="bool | None"))
    wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper


@_with_progress
def optimize(model, passes: Sequence = (), example_inputs: Any = None, *, backend: str = "torch",
             calibration: Any = None, check: bool = False, dynamic_batch: bool = True,
             dynamic_shapes=None, backend_options: dict | None = None) -> OptimizedModel:
    """Optimize ``model`` (a ``torch.nn.Module``, an IR ``Graph``, or an ONNX model: ``.onnx`` path or
    ``onnx.ModelProto``) with ``passes``.

    ``example_inputs``: a tensor, a tuple of positional inputs, a dict of keyword inputs, or ``(args, kwargs)``;
    numpy arrays among them are taken as the tensors they hold (same dtype and shape, copied).
    ``check=True`` compares every pass numerically with the graph before it on those inputs; without it
    the passes' results must still run on them.
    ``progress=False`` turns off the progress display (also ``GRAPHOPT_PROGRESS=0``); off a terminal
    it is one line per step on stderr.
    """
    if isinstance(passes, str):  # one pass ("cse" or "low_rank:ratio=0.5"), not its letters
        passes = [passes]
    report = Report()
    args, kwargs = _split_inputs(example_inputs)
    source = None
    if _is_onnx(model):
        from graphopt.frontends import from_onnx

        if isinstance(model, (str, os.PathLike)):
            source = os.path.abspath(os.fspath(model))

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
        raise TypeError(_not_a_model(model))
    flat = None
    if example_inputs is not None:
        try:
            flat = _flat_tensors(graph, args, kwargs)
        except TypeError as e:
            raise ValueError(f"example_inputs: {e}") from None
        if not isinstance(model, torch.nn.Module):  # a capture makes the graph fit its inputs
            flat = _cast_to_graph(graph, flat)
            check_inputs(graph, flat, what="example_inputs")
    if calibration is not None:
        calibration = calibration_batches(graph, calibration)
    with task("cost model of the graph before"):
        report.cost_before = graph_cost(graph)
    graph, report = PassManager(passes, example_inputs=flat, calibration=calibration, check=check).run(graph, report)
    with task("cost model of the graph after"):
        report.cost_after = graph_cost(graph)
    return OptimizedModel(graph, report, backend, backend_options, source=source)


def _is_onnx(model) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model).lower().endswith(".onnx")
    return type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx")


def _split_inputs(example_inputs, what: str = "example_inputs") -> tuple[tuple, dict]:
    """(args, kwargs) from the accepted forms, numpy arrays as tensors; a TypeError naming the position
    of anything that cannot be a model input."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], tuple)
            and isinstance(example_inputs[1], dict)):
        args, kwargs = example_inputs
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TypeError(f"{what} must be a tensor, a tuple or list of positional inputs, a dict of keyword inputs "
                        f"or (args, kwargs); got {type(example_inputs).__name__}")

    def leaf(path, x):
        if isinstance(x, np.ndarray):
            try:
                return torch.tensor(x)
            except (TypeError, RuntimeError):
                raise TypeError(f"{what}{pytree.keystr(path)} is a numpy array of {x.dtype}, which has no torch "
                                f"dtype; expected a numeric or bool array") from None
        if isinstance(x, (str, bytes)):
            raise TypeError(f"{what}{pytree.keystr(path)} is a {type(x).__name__} ({x!r:.40}); expected a "
                            f"torch.Tensor (or a numpy array)")
        return x

    return pytree.tree_map_with_path(leaf, tuple(args)), pytree.tree_map_with_path(leaf, dict(kwargs))


# Calibration values whose square overflows float32 (norms, dot products) cannot give a finite range.
_CALIBRATION_LIMIT = torch.finfo(torch.float32).max ** 0.5


def _check_calibration_values(graph: Graph, flat, i: int) -> None:
    for value, tensor in zip(graph.inputs, flat):
        if not tensor.is_floating_point() or not tensor.numel():
            continue
        where = f"calibration item {i}: input %{value.name}"
        bad = torch.isnan(tensor)
        if bad.any():
            raise ValueError(f"{where} contains NaN (first at index {_first(bad)}); calibration needs finite values")
        bad = torch.isinf(tensor)
        if bad.any():
            raise ValueError(f"{where} contains Inf (first at index {_first(bad)}); calibration needs finite values")
        bad = tensor.abs() > _CALIBRATION_LIMIT
        if bad.any():
            raise ValueError(f"{where} has a value of magnitude {tensor.abs().max().item():.3g} (first at index "
                             f"{_first(bad)}): too large to calibrate (its square overflows float32, so int8 ranges "
                             f"and scales would not be finite); keep values below {_CALIBRATION_LIMIT:.3g}")


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def calibration_batches(graph: Graph, calibration) -> list[tuple[torch.Tensor, ...]]:
    """Each calibration item (same forms as example_inputs) as flat tensors, one per graph input,
    checked against the graph's input types so a wrong shape or name fails here, clearly."""
    if isinstance(calibration, (torch.Tensor, dict)) or not hasattr(calibration, "__iter__"):
        raise TypeError("calibration must be a list of example inputs (tuples, dicts or (args, kwargs))")
    batches = []
    for i, item in enumerate(calibration):
        try:
            args, kwargs = _split_inputs(item, f"calibration item {i}")
        except TypeError as e:
            raise ValueError(str(e)) from None
        try:
            flat = _flat_tensors(graph, args, kwargs)
        except TypeError as e:
            raise ValueError(f"calibration item {i}: {e}") from None
        _check_calibration_values(graph, flat, i)
        flat = _cast_to_graph(graph, flat)
        check_inputs(graph, flat, what=f"calibration item {i}")
        batches.append(flat)
    if not batches:
        raise ValueError("calibration is empty")
    return batches


def check_inputs(graph: Graph, flat: Sequence[torch.Tensor], *, what: str = "") -> None:
    """Each tensor against its graph input: count, rank, dtype, static dims and one size per symbolic dim,
    so a wrong input (or a call at a batch the graph was not captured for) fails here naming the input,
    not deep in a reshape. ``what`` ("example_inputs", "calibration item 2") starts each message."""
    prefix = f"{what}: " if what else ""
    if len(flat) != len(graph.inputs):
        raise ValueError(f"{what or 'the call'} has {len(flat)} tensors; the graph takes {len(graph.inputs)} "
                         f"({', '.join(f'%{v.name}: {v.type}' for v in graph.inputs)})")
    sizes: dict = {}
    for position, (value, tensor) in enumerate(zip(graph.inputs, flat)):
        t, which = value.type, f" (input {position} of {len(flat)})"
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{prefix}input %{value.name} is a {type(tensor).__name__}, the graph expects a "
                             f"tensor {t}{which}")
        given = f"{prefix}input %{value.name} is {tuple(tensor.shape)} {tensor.dtype}"
        if tensor.dim() != t.rank:
            raise ValueError(f"{given}, the graph expects {t}{which}")
        if tensor.dtype != t.dtype:
            raise ValueError(f"{given}, the graph expects {t}{which}: give it as {t.dtype}")
        for axis, (d, n) in enumerate(zip(t.shape, tensor.shape)):
            if isinstance(d, int) and d != n:
                hint = (" (the model was captured with a static batch; capture with dynamic_batch=True to run "
                        "at any batch)") if axis == 0 else ""
                raise ValueError(f"{given}, the graph expects {t}{which}: axis {axis} must be {d}{hint}")
            if not isinstance(d, int) and sizes.setdefault(d, (n, value.name))[0] != n:
                raise ValueError(f"{given}, the graph expects {t}{which}: axis {axis} ({d}) is {sizes[d][0]} in "
                                 f"%{sizes[d][1]}")
            if not isinstance(d, int) and n == 0:       # the backends' kernels and reshapes differ on empty inputs
                raise ValueError(f"{given}, the graph expects {t}{which}: axis {axis} ({d}) is empty; give at "
                                 "least one item")
        bound = index_bound(value) if not t.dtype.is_floating_point and tensor.numel() else None
        if bound is not None:
            outside = (tensor < 0) | (tensor >= bound)
            if outside.any():
                at = _first(outside)
                raise ValueError(f"{prefix}input %{value.name} holds {tensor[at].item()} at {list(at)}; it indexes a "
                                 f"table of {bound} rows, so its values must be in [0, {bound}){which}")


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
    if isinstance(model, (str, os.PathLike)):
        return (f"optimize got the path {os.fspath(model)!r}: a path must name an .onnx file; load a torch model "
                "yourself and pass the module, and load a saved graphopt IR file with graphopt.load_graph(path)")
    return (f"optimize takes a torch.nn.Module, a graphopt Graph, an .onnx path or an onnx.ModelProto, "
            f"not {type(model).__name__}")
