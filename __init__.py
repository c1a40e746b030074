"""graphopt: a compiler-style graph transformation framework for trained neural networks."""
from graphopt.ir import Graph, TensorType, register_op, verify  # noqa: F401

__version__ = "0.1.0"
