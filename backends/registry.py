"""Backend registry: a backend turns a graph into something callable like the original model."""
from __future__ import annotations

import difflib
from typing import Callable

from graphopt.ir import Graph

_BACKENDS: dict[str, Callable[..., Callable]] = {}
_SAVERS: dict[str, Callable[[Graph, str], None]] = {}


def register_backend(name: str):
    def wrap(fn):
        _BACKENDS[name] = fn
        return fn
    return wrap


def register_saver(suffix: str):
    """Register a writer for files ending in ``suffix`` (e.g. ``.onnx``)."""
    def wrap(fn):
        _SAVERS[suffix] = fn
        return fn
    return wrap


def lower(graph: Graph, backend: str, **options) -> Callable:
    _load()
    if backend not in _BACKENDS:
        close = difflib.get_close_matches(backend, list(_BACKENDS), n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown backend {backend!r}{hint}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[backend](graph, **options)


def save(graph: Graph, path: str) -> None:
    _load()
    for suffix, saver in _SAVERS.items():
        if str(path).endswith(suffix):
            return saver(graph, path)
    from graphopt.ir.serialize import save_graph
    save_graph(graph, path)


def list_backends() -> list[str]:
    _load()
    return sorted(_BACKENDS)


@register_backend("torch")
def _torch(graph: Graph):
    from graphopt.backends.torch_backend import TorchExecutable
    return TorchExecutable(graph).eval()


def _load() -> None:
    """Optional backends register themselves when their module imports cleanly."""
    import importlib

    for module in ("graphopt.backends.onnxruntime_backend", "graphopt.backends.cpu_integer"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
