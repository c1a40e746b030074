"""Backend registry: a backend turns a graph into something callable like the original model.

Backends and savers are ``Registry`` tables: the built-ins register when their module imports
(a missing dependency of one is an error, not a silently missing backend), plugins through the ``graphopt.backends`` and
``graphopt.savers`` entry-point groups.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from graphopt.ir import Graph
from graphopt.ir.registry import Registry

OPTIONAL_BACKENDS = ("graphopt.backends.onnxruntime_backend", "graphopt.backends.cpu_integer")


def _load_builtins() -> None:
    for module in OPTIONAL_BACKENDS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


BACKENDS: Registry[Callable[..., Callable]] = Registry("backend", group="graphopt.backends", error=ValueError,
                                                       builtins=_load_builtins)
SAVERS: Registry[Callable[[Graph, str], None]] = Registry("saver", group="graphopt.savers", error=ValueError,
                                                          builtins=_load_builtins)


def register_backend(name: str, *, replace: bool = False):
    return BACKENDS.decorator(name, replace=replace)


def register_saver(suffix: str, *, replace: bool = False):
    """Register a writer for files ending in ``suffix`` (e.g. ``.onnx``)."""
    return SAVERS.decorator(suffix, replace=replace)


def lower(graph: Graph, backend: str, **options) -> Callable:
    factory = BACKENDS.get(backend)
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):     # **options: the backend checks them itself
        takes = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
        unknown = sorted(set(options) - set(takes))
        if unknown:
            raise TypeError(f"unknown {backend} backend options {unknown}; it takes "
                            + (", ".join(takes) if takes else "none"))
    return factory(graph, **options)


def save(graph: Graph, path: str) -> None:
    for suffix, saver in SAVERS.items():
        if str(path).lower().endswith(suffix.lower()):     # model.ONNX is an ONNX file too
            return saver(graph, path)
    from graphopt.ir.serialize import save_graph
    save_graph(graph, path)


def list_backends() -> list[str]:
    return BACKENDS.names()


@register_backend("torch")
def _torch(graph: Graph):
    from graphopt.backends.torch_backend import TorchExecutable
    return TorchExecutable(graph).eval()
