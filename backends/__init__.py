"""Backends lower the IR to something that runs."""
from graphopt.backends.torch_backend import LoweringError, TorchExecutable, to_fx

__all__ = ["LoweringError", "TorchExecutable", "to_fx"]
