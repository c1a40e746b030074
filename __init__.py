"""graphopt: a compiler-style graph transformation framework for trained neural networks."""
from graphopt.ir import Graph, TensorType, register_op, verify
from graphopt.ir.serialize import IRFileError, load_graph
from graphopt.passes import PassError, list_passes, option, pass_help, register_pass
from graphopt.pipeline import OptimizedModel, optimize

__version__ = "0.1.0"

__all__ = ["Graph", "IRFileError", "OptimizedModel", "PassError", "TensorType", "list_passes", "load_graph",
           "optimize", "option", "pass_help", "register_op", "register_pass", "verify"]
